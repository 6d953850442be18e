"""Model wrappers: one contract (``predict``) for every network class stepdistill distils."""

from .conditioning import Cond
from .denoiser import SUPPORTED_NETWORKS, Denoiser, network_call
from .fake_score import FakeScore
from .generator import Generator
from .loading import load_network
from .teacher import Teacher

__all__ = [
    "Cond",
    "Denoiser",
    "FakeScore",
    "Generator",
    "Teacher",
    "SUPPORTED_NETWORKS",
    "load_network",
    "network_call",
]
