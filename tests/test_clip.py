"""The frozen CLIP wrapper: geometry, D-side taps, G-side mapper, text, freezing and weight loading."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch
from einops import rearrange
from torch import nn

from galip.clip import CLIPGeometry, CLIPWeightsMissing, load_clip
from galip.clip import backbone as clip_backbone
from tests.helpers import TINY_CLIP_CFG

SOT, EOT = 49406, 49407


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def image_embedding(clip, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return clip.model.encode_image(clip.preprocess(x))


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def test_geometry_vitb32(vitb32_clip):
    assert vitb32_clip.geometry == CLIPGeometry(
        width=768, grid=7, depth=12, embed_dim=512, image_size=224, context_length=77
    )


def test_geometry_tiny(tiny_clip):
    assert tiny_clip.geometry == CLIPGeometry(
        width=64, grid=8, depth=4, embed_dim=64, image_size=64, context_length=77
    )


# ---------------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------------


def test_preprocess_maps_minus_one_one_to_clip_normalised(tiny_clip):
    x = images(2, 64)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(tiny_clip.preprocess(x), ((x + 1) / 2 - mean) / std)


def test_preprocess_official_bug_flag_maps_to_half_one(tiny_clip):
    x = images(2, 64)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tiny_clip.official_preprocess_bug = True
    try:
        got = tiny_clip.preprocess(x)
    finally:
        tiny_clip.official_preprocess_bug = False
    torch.testing.assert_close(got, (((x + 1) / 2 + 1) / 2 - mean) / std)


def test_preprocess_resizes_to_clip_input(tiny_clip):
    assert tiny_clip.preprocess(images(2, 96)).shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# D side: taps
# ---------------------------------------------------------------------------------------------


def hooked_block_outputs(clip, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reference: every block's output captured with forward hooks during open_clip's own encode_image."""
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        for block in clip.visual.transformer.resblocks
    ]
    try:
        emb = image_embedding(clip, x)
    finally:
        for h in handles:
            h.remove()
    if not getattr(clip.visual.transformer, "batch_first", True):
        outputs = [o.transpose(0, 1) for o in outputs]
    grid = clip.geometry.grid
    maps = [rearrange(o[:, 1:], "b (h w) c -> b c h w", h=grid, w=grid) for o in outputs]
    return maps, emb


@pytest.mark.parametrize("geometry", ["tiny", "vitb32"])
def test_taps_shape_order_and_values_match_open_clip(geometry, request):
    clip = request.getfixturevalue(f"{geometry}_clip")
    geo = clip.geometry
    blocks = (1, 3, 2) if geometry == "tiny" else (1, 4, 8)
    x = images(2, geo.image_size)
    with torch.no_grad():
        taps, emb = clip.image_taps(x, blocks)
    assert taps.shape == (2, len(blocks), geo.width, geo.grid, geo.grid)
    assert emb.shape == (2, geo.embed_dim)
    ref_maps, ref_emb = hooked_block_outputs(clip, x)
    for slot, block in enumerate(blocks):
        torch.testing.assert_close(taps[:, slot], ref_maps[block])
    torch.testing.assert_close(emb, ref_emb)


def test_tap_order_follows_blocks_argument(tiny_clip):
    x = images(2, 64)
    with torch.no_grad():
        a, _ = tiny_clip.image_taps(x, (0, 3))
        b, _ = tiny_clip.image_taps(x, (3, 0))
    torch.testing.assert_close(a, b.flip(1))
    assert not torch.allclose(a[:, 0], a[:, 1])


def test_tap_token_layout_is_row_major(tiny_clip, monkeypatch):
    """Token t of the sequence lands at (row t // grid, col t % grid) of the map."""
    from galip.clip import taps as taps_module

    x = images(1, 64)
    grid = tiny_clip.geometry.grid
    outputs = []  # each block's output sequence, in order
    run_block = taps_module.run_block
    monkeypatch.setattr(
        taps_module, "run_block", lambda block, h: outputs.append(run_block(block, h)) or outputs[-1]
    )
    with torch.no_grad():
        taps, _ = tiny_clip.image_taps(x, (2,), with_embedding=False)
    assert len(outputs) == 3  # blocks 0, 1, 2: none after the last tap
    tokens = outputs[2][0, 1:]  # [grid², width], CLS dropped
    for t in (0, 1, grid, grid + 3, grid * grid - 1):
        torch.testing.assert_close(taps[0, 0, :, t // grid, t % grid], tokens[t])


@pytest.mark.parametrize("geometry", ["tiny", "vitb32"])
def test_embedding_equals_open_clip_encode_image(geometry, request):
    clip = request.getfixturevalue(f"{geometry}_clip")
    x = images(2, clip.geometry.image_size, seed=1)
    with torch.no_grad():
        _, emb = clip.image_taps(x, (0,))
    torch.testing.assert_close(emb, image_embedding(clip, x))


def test_embedding_of_non_native_size_uses_resized_input(tiny_clip):
    x = images(2, 80, seed=2)
    with torch.no_grad():
        _, emb = tiny_clip.image_taps(x, (1,))
    torch.testing.assert_close(emb, image_embedding(tiny_clip, x))


def test_taps_without_embedding_are_identical(tiny_clip):
    x = images(3, 64, seed=3)
    with torch.no_grad():
        with_emb, emb = tiny_clip.image_taps(x, (0, 2), with_embedding=True)
        without, none = tiny_clip.image_taps(x, (0, 2), with_embedding=False)
    assert emb is not None and none is None
    torch.testing.assert_close(without, with_emb, rtol=0, atol=0)


def test_taps_without_embedding_skip_later_blocks(tiny_clip):
    calls = []
    # the block's first LayerNorm runs whichever way the block is run (galip.clip.blocks.run_block or its own forward)
    handle = tiny_clip.visual.transformer.resblocks[3].ln_1.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            tiny_clip.image_taps(images(1, 64), (0, 1), with_embedding=False)
        assert calls == []
        with torch.no_grad():
            tiny_clip.image_taps(images(1, 64), (0, 1), with_embedding=True)
        assert calls == [1]
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# G side: the prompted mapper
# ---------------------------------------------------------------------------------------------


def reference_mapper(clip, bridge: torch.Tensor, prompt_at: dict[int, torch.Tensor]) -> torch.Tensor:
    """Hand-built from open_clip's submodules: bridge tokens + CLS + positions, ln_pre, blocks, prompt per block."""
    visual = clip.visual
    b, c, h, w = bridge.shape
    tokens = bridge.flatten(2).transpose(1, 2)  # [B, h·w, C], token t = (t // w, t % w)
    cls = visual.class_embedding.view(1, 1, c).expand(b, 1, c)
    x = visual.ln_pre(torch.cat([cls, tokens], dim=1) + visual.positional_embedding)
    for i, block in enumerate(visual.transformer.resblocks):
        x = block(torch.cat([x, prompt_at[i][:, None, :]], dim=1))[:, :-1] if i in prompt_at else block(x)
    return x[:, 1:].transpose(1, 2).reshape(b, c, h, w)


def bridge_and_prompts(clip, n_prompts: int, batch: int = 2, seed: int = 0):
    geo = clip.geometry
    gen = torch.Generator().manual_seed(seed)
    bridge = torch.randn(batch, geo.width, geo.grid, geo.grid, generator=gen)
    prompts = torch.randn(batch, n_prompts, geo.width, generator=gen)
    return bridge, prompts


@pytest.mark.parametrize("geometry", ["tiny", "vitb32"])
def test_mapper_without_prompts_is_plain_vit_on_bridge_tokens(geometry, request):
    clip = request.getfixturevalue(f"{geometry}_clip")
    bridge, _ = bridge_and_prompts(clip, 0)
    with torch.no_grad():
        got = clip.map_bridge(bridge, None, ())
        ref = reference_mapper(clip, bridge, {})
    assert got.shape == bridge.shape
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("prompt_blocks", [(1,), (0, 3), (1, 2), (0, 1, 2, 3)])
def test_mapper_prompts_live_for_exactly_their_block(tiny_clip, prompt_blocks):
    bridge, prompts = bridge_and_prompts(tiny_clip, len(prompt_blocks))
    with torch.no_grad():
        got = tiny_clip.map_bridge(bridge, prompts, prompt_blocks)
        ref = reference_mapper(tiny_clip, bridge, {b: prompts[:, k] for k, b in enumerate(prompt_blocks)})
    torch.testing.assert_close(got, ref)


def test_mapper_vitb32_paper_prompts(vitb32_clip):
    blocks = tuple(range(1, 9))
    bridge, prompts = bridge_and_prompts(vitb32_clip, len(blocks), batch=1)
    with torch.no_grad():
        got = vitb32_clip.map_bridge(bridge, prompts, blocks)
        ref = reference_mapper(vitb32_clip, bridge, {b: prompts[:, k] for k, b in enumerate(blocks)})
    assert got.shape == (1, 768, 7, 7)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("block", [0, 1, 2, 3])
def test_prompt_changes_output_only_when_its_block_is_listed(tiny_clip, block):
    bridge, prompts = bridge_and_prompts(tiny_clip, 1, seed=block)
    with torch.no_grad():
        plain = tiny_clip.map_bridge(bridge, None, ())
        prompted = tiny_clip.map_bridge(bridge, prompts, (block,))
        # a different prompt (not a constant shift: ln_1 would normalise that away)
        other_prompt = tiny_clip.map_bridge(bridge, prompts.flip(-1), (block,))
        unlisted = tiny_clip.map_bridge(bridge, prompts, ())
    assert not torch.allclose(prompted, plain, atol=1e-5)
    assert not torch.allclose(prompted, other_prompt, atol=1e-5)
    torch.testing.assert_close(unlisted, plain, rtol=0, atol=0)


def test_mapper_ignores_prompts_beyond_listed_blocks(tiny_clip):
    """Only ``prompts[:, k]`` for the k-th listed block is read; extra rows (for unlisted blocks) do nothing."""
    bridge, prompts = bridge_and_prompts(tiny_clip, 3)
    junk = prompts.clone()
    junk[:, 1:] = torch.randn_like(junk[:, 1:]) * 10
    with torch.no_grad():
        a = tiny_clip.map_bridge(bridge, prompts, (2,))
        b = tiny_clip.map_bridge(bridge, junk, (2,))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mapper_passes_gradient_to_bridge_and_prompts_not_clip(tiny_clip):
    bridge, prompts = bridge_and_prompts(tiny_clip, 2)
    bridge.requires_grad_(True)
    prompts.requires_grad_(True)
    tiny_clip.map_bridge(bridge, prompts, (1, 2)).square().sum().backward()
    assert bridge.grad is not None and bridge.grad.abs().sum() > 0
    assert (
        prompts.grad is not None and prompts.grad[:, 0].abs().sum() > 0 and prompts.grad[:, 1].abs().sum() > 0
    )
    assert all(p.grad is None for p in tiny_clip.parameters())


# ---------------------------------------------------------------------------------------------
# Frozen
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["tiny", "vitb32"])
def test_clip_is_frozen_and_stays_in_eval(geometry, request):
    clip = request.getfixturevalue(f"{geometry}_clip")
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training
    assert not any(m.training for m in clip.modules())
    parent = nn.Module()
    parent.clip = clip
    parent.train(True)
    assert not any(m.training for m in clip.modules())


def test_fresh_clip_is_in_eval_mode_without_calling_train():
    clip = load_clip(name=None, model_cfg=TINY_CLIP_CFG)
    assert not any(m.training for m in clip.model.modules())  # holds today
    assert not clip.training


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["tiny", "vitb32"])
def test_tokenizer_shape_dtype_and_markers(geometry, request):
    clip = request.getfixturevalue(f"{geometry}_clip")
    tokens = clip.tokenize(["a red bird", "two cats on a sofa", " ".join(["word"] * 200)])
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == SOT).all()
    assert (tokens.argmax(dim=1) == (tokens == EOT).int().argmax(dim=1)).all()
    assert tokens[2, -1] == EOT  # truncated, EOT kept
    assert (tokens[0, 5:] == 0).all()  # "a red bird" = SOT + 3 words + EOT, then padding


@pytest.mark.parametrize("geometry", ["tiny", "vitb32"])
def test_encode_text_equals_open_clip_unnormalised(geometry, request):
    clip = request.getfixturevalue(f"{geometry}_clip")
    tokens = clip.tokenize(["a red bird", "two cats on a sofa"])
    sent = clip.encode_text(tokens)
    with torch.no_grad():
        ref = clip.model.encode_text(tokens, normalize=False)
    assert sent.shape == (2, clip.geometry.embed_dim) and sent.dtype == torch.float32
    assert not sent.requires_grad
    torch.testing.assert_close(sent, ref)
    assert not torch.allclose(sent.norm(dim=1), torch.ones(2))  # not L2-normalised


# ---------------------------------------------------------------------------------------------
# Weights from local files
# ---------------------------------------------------------------------------------------------


def outputs_of(clip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = images(2, clip.geometry.image_size, seed=7)
    with torch.no_grad():
        taps, emb = clip.image_taps(x, (0, 3))
    return taps, emb, clip.encode_text(clip.tokenize(["a red bird", "a blue car"]))


def assert_same_outputs(a, b) -> None:
    for x, y in zip(outputs_of(a), outputs_of(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.fixture(scope="module")
def source_clip():
    """A tiny CLIP with its own random weights (a fresh build would have different ones)."""
    torch.manual_seed(1234)
    return load_clip(name=None, model_cfg=TINY_CLIP_CFG)


def reload(path) -> object:
    torch.manual_seed(999)  # a different random init, so a silent no-op load cannot pass
    return load_clip(name=None, model_cfg=TINY_CLIP_CFG, path=path)


def test_fresh_tiny_clip_differs_from_source(source_clip):
    torch.manual_seed(999)
    fresh = load_clip(name=None, model_cfg=TINY_CLIP_CFG)
    assert not torch.allclose(outputs_of(fresh)[1], outputs_of(source_clip)[1])


def test_load_openai_style_state_dict_with_meta_keys_and_module_prefix(source_clip, tmp_path):
    state = {f"module.{k}": v for k, v in source_clip.model.state_dict().items()}
    state.update(input_resolution=64, context_length=77, vocab_size=49408)
    torch.save(state, tmp_path / "openai_style.pt")
    assert_same_outputs(reload(tmp_path / "openai_style.pt"), source_clip)


def test_load_state_dict_with_tensor_meta_keys(source_clip, tmp_path):
    """What ``torch.jit.load(ViT-B-32.pt).state_dict()`` holds: the meta keys as 0-d tensors."""
    state = dict(source_clip.model.state_dict())
    state.update(
        input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    torch.save(state, tmp_path / "jit_state.pt")
    assert_same_outputs(reload(tmp_path / "jit_state.pt"), source_clip)


def test_load_lightning_style_checkpoint(source_clip, tmp_path):
    state = {f"model.{k}": v for k, v in source_clip.model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, tmp_path / "lightning.ckpt")
    assert_same_outputs(reload(tmp_path / "lightning.ckpt"), source_clip)


def test_load_frozen_clip_state_dict(source_clip, tmp_path):
    """A ``FrozenCLIP.state_dict()`` (keys ``model.…``) reloads as well."""
    torch.save(source_clip.state_dict(), tmp_path / "frozen.pt")
    assert_same_outputs(reload(tmp_path / "frozen.pt"), source_clip)


def test_load_checkpoint_with_galip_module_clip_prefix(source_clip, tmp_path):
    state = {f"clip.{k}": v for k, v in source_clip.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "galip_module.ckpt")
    assert_same_outputs(reload(tmp_path / "galip_module.ckpt"), source_clip)


class _Holder(nn.Module):
    """An empty module tree: only used to hold tensors under given dotted names for a TorchScript archive."""


def openai_style_torchscript(state: dict[str, torch.Tensor], meta: dict[str, int]) -> torch.jit.ScriptModule:
    """A TorchScript archive laid out like OpenAI's ``ViT-B-32.pt``: the CLIP tensors plus 0-d meta tensors."""
    root = _Holder()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
    for key, value in meta.items():
        root.register_buffer(key, torch.tensor(value))
    return torch.jit.script(root)


def test_load_openai_layout_torchscript_archive(source_clip, tmp_path):
    archive = openai_style_torchscript(
        source_clip.model.state_dict(), {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}
    )
    torch.jit.save(archive, str(tmp_path / "ViT-tiny.pt"))
    assert clip_backbone._is_torchscript(tmp_path / "ViT-tiny.pt")
    assert_same_outputs(reload(tmp_path / "ViT-tiny.pt"), source_clip)


def test_load_scripted_open_clip_model(source_clip, tmp_path):
    torch.jit.save(torch.jit.script(source_clip.model), str(tmp_path / "scripted.pt"))
    assert_same_outputs(reload(tmp_path / "scripted.pt"), source_clip)


def test_missing_file_raises_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "ViT-B-32.pt"
    with pytest.raises(CLIPWeightsMissing) as info:
        load_clip(name=None, model_cfg=TINY_CLIP_CFG, path=missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_wrong_architecture_file_is_rejected(source_clip, tmp_path):
    state = dict(source_clip.model.state_dict())
    state.pop("visual.proj")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="visual.proj"):
        reload(tmp_path / "partial.pt")


def test_uncached_pretrained_tag_message(tmp_path):
    """The resolver alone: offline, an uncached tag fails at once and says how to get the weights."""
    start = time.perf_counter()
    with pytest.raises(CLIPWeightsMissing) as info:
        clip_backbone.resolve_pretrained("ViT-B-32-quickgelu", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert "clip.path" in str(info.value) and "clip.download" in str(info.value)


def test_uncached_pretrained_tag_fails_before_building(tmp_path, monkeypatch):
    def refuse_to_build(*_args, **_kwargs):
        raise AssertionError("load_clip built the model before finding out the weights are missing")

    monkeypatch.setattr(clip_backbone, "_build", refuse_to_build)
    start = time.perf_counter()
    with pytest.raises(CLIPWeightsMissing) as info:
        load_clip("ViT-B-32-quickgelu", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert "clip.path" in str(info.value) and "clip.download" in str(info.value)


def test_uncached_pretrained_tag_raises_offline_even_with_download(tmp_path):
    """``download=True`` must not try the network under HF_HUB_OFFLINE=1 (set by conftest)."""
    start = time.perf_counter()
    with pytest.raises(CLIPWeightsMissing):
        clip_backbone.resolve_pretrained(
            "ViT-B-32-quickgelu", "openai", cache_dir=str(tmp_path), download=True
        )
    assert time.perf_counter() - start < 5


def test_unknown_pretrained_tag_is_a_value_error():
    with pytest.raises(ValueError, match="openai"):
        clip_backbone.resolve_pretrained("ViT-B-32-quickgelu", "no-such-tag")
