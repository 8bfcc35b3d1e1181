"""Training objectives and samplers (over diffusers' schedulers), registered by name."""
from .objectives import OBJECTIVES, DDPMObjective, FlowObjective, get_objective
from .samplers import SAMPLERS, GenerationCancelled, get_sampler, guided_output, initial_noise, sample, sampler_names

__all__ = ["OBJECTIVES", "DDPMObjective", "FlowObjective", "get_objective", "SAMPLERS", "GenerationCancelled", "get_sampler",
           "guided_output", "initial_noise", "sample", "sampler_names"]
