"""Grafting: swap operators inside a trained DiT, distil them layer by layer, fine-tune (`python -m dit.graft`).

Chandrasegaran et al. 2025, "Exploring Diffusion Transformer Designs via Grafting" (reference notes B):
- `layers`: the layer-spec parser (`all`, `odd`, `even`, `0-5`, `3,7,9`, `50%`);
- `replace`: operator replacement / restructuring into parallel blocks, weight copying, stage-1 units;
- `distill`: stage 1, activation distillation on cached activations, the stage-1 file;
- `run`: the pipeline (stage 2 through train.py's machinery; DyDiT routers added to a trained model);
- `report`: report JSON / Markdown and model card.
"""
from .layers import LayerSpecError, parse_layers
from .replace import GraftError, Replacement, Unit, build_grafted, graft_config, restructure_config
from .run import GraftSettings, run_graft

__all__ = ["GraftError", "GraftSettings", "LayerSpecError", "Replacement", "Unit", "build_grafted", "graft_config",
           "parse_layers", "restructure_config", "run_graft"]
