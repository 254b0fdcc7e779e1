"""Plain nn.Modules (no Lightning, no Hydra): GALIP's Mate-G and Mate-D."""

from galip.models.discriminator import CLIPFeatureExtractor, Discriminator, QualityAssessor
from galip.models.generator import BridgeFeaturePredictor, Generator, ImageDecoder, PromptPredictor

__all__ = [
    "BridgeFeaturePredictor",
    "CLIPFeatureExtractor",
    "Discriminator",
    "Generator",
    "ImageDecoder",
    "PromptPredictor",
    "QualityAssessor",
]
