"""GaLore (Zhao et al., 2024): full-rank weights, Adam run on a low-rank projection of each matrix's gradient.

Every attention and MLP matrix (the model family's projections, as relora.target_modules picks them) is trained by
galore-torch's `GaLoreAdamW`: each step its gradient G (out × in) is projected onto the top galore.rank singular
vectors of G (recomputed every galore.update_proj_gap steps), Adam's moments live in that r-dimensional space, and
the update is projected back and scaled by galore.scale. Everything else (embeddings, norms, the head) takes plain
AdamW in the same optimizer. The optimizer state is a low-rank matrix per projected weight, not two full ones.

DeepSpeed must hand the optimizer whole matrices: ZeRO stage 0, in fp32 or bf16 (DeepSpeed's bf16 at stage 0 keeps one
fp32 master per parameter, whole). ZeRO-1/2/3 flatten the parameters into partitions that cut across matrices, so they
are refused at step 0. The projector of each matrix is saved in the optimizer's state as plain tensors
(`state_dict` hooks below), so a checkpoint holds no pickled objects and a resume continues the same projection.
"""

from dataclasses import dataclass

import torch

from relora_ds.fields import setting
from relora_ds.methods.base import Method
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import wrap_targets

PROJECTIONS = ("std", "reverse_std", "right", "left", "full")


@dataclass
class GaLoreConfig:
    rank: int = setting(128, "rank r of each projected gradient (and of its Adam moments)")
    update_proj_gap: int = setting(200, "steps between recomputing each matrix's projection (an SVD of its gradient)")
    scale: float = setting(0.25, "scale of the projected-back update (the paper's alpha)")
    proj_type: str = setting("std", "which side is projected: std projects the smaller dimension", PROJECTIONS)


class GaLore(Method):
    name = "galore"
    section, Config = "galore", GaLoreConfig

    @classmethod
    def validate(cls, cfg) -> list[str]:
        g = cfg.galore
        errors = super().validate(cfg)
        for key in ("rank", "update_proj_gap"):
            if getattr(g, key) < 1:
                errors.append(f"galore.{key}: must be >= 1, got {getattr(g, key)}")
        if not g.scale > 0:
            errors.append(f"galore.scale: must be > 0, got {g.scale}")
        return errors

    @classmethod
    def compare_variants(cls) -> list:
        return [("galore", "GaLore: full-rank weights, Adam on projected gradients, from step 0; ΔW measured from step W",
                 lambda base: {"method": "galore", "relora.warm_start_steps": 0,
                               "checkpoint.reference_step": base.relora.warm_start_steps})]

    def check_ds_config(self, ds_config: dict) -> None:
        try:
            import galore_torch  # noqa: F401  (installed? galore-torch is an extra)
        except ImportError as e:
            raise ValueError(f"method galore: needs the galore-torch package (pip install 'relora-ds[galore]'): "
                             f"{e}") from None
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage != 0:
            raise ValueError(f"method galore: needs zero_optimization.stage 0 in the DeepSpeed JSON, got {stage}: ZeRO-1/2/3 "
                             f"flatten parameters into partitions that cut across the matrices GaLore projects")
        if ds_config.get("fp16", {}).get("enabled"):
            raise ValueError("method galore: runs in fp32 or bf16; fp16 is enabled in the DeepSpeed JSON")

    def check(self, model) -> None:
        wrap_targets(model, target_modules_of(model, self.cfg.relora.target_modules), 1)

    def optimizer(self, model, ds_config: dict):
        """Two groups: the projected matrices (the family's projections) and everything else; one GaLoreAdamW with
        the DeepSpeed JSON's AdamW settings (lr, betas, eps, weight_decay)."""
        from galore_torch import GaLoreAdamW

        g = self.cfg.galore
        targets = set(wrap_targets(model, target_modules_of(model, self.cfg.relora.target_modules), 1))
        projected = [m.weight for name, m in model.named_modules() if name in targets]
        ids = {id(p) for p in projected}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": others},
                  {"params": projected, "rank": g.rank, "update_proj_gap": g.update_proj_gap, "scale": g.scale,
                   "proj_type": g.proj_type}]
        params = dict(ds_config.get("optimizer", {}).get("params", {}))
        optimizer = GaLoreAdamW(groups, lr=params.get("lr", self.cfg.schedule.lr),
                                betas=tuple(params.get("betas", (0.9, 0.999))), eps=params.get("eps", 1e-8),
                                weight_decay=params.get("weight_decay", 0.0), no_deprecation_warning=True)
        optimizer.register_state_dict_post_hook(_projectors_as_tensors)
        optimizer.register_load_state_dict_pre_hook(_projectors_from_tensors)
        return groups, optimizer


def _projectors_as_tensors(optimizer, state_dict: dict) -> dict:
    """The state dict with each GaLoreProjector replaced by its matrix (tensors only: a weights-only load reads it)."""
    state = {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        projector = entry.pop("projector", None)
        if projector is not None and projector.ortho_matrix is not None:
            ortho = projector.ortho_matrix
            entry["galore_ortho"] = torch.stack(ortho) if isinstance(ortho, list) else ortho  # "full": a pair
        state[key] = entry
    return {**state_dict, "state": state}


def _projectors_from_tensors(optimizer, state_dict: dict) -> None:
    """Rebuild each saved matrix into a GaLoreProjector with its group's settings (in place, before the load)."""
    from galore_torch.galore_projector import GaLoreProjector

    group_of = {}
    for group in state_dict["param_groups"]:
        for index in group["params"]:
            group_of[index] = group
    for index, entry in state_dict["state"].items():
        ortho = entry.pop("galore_ortho", None)
        if ortho is None:
            continue
        group = group_of[index]
        projector = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                                    proj_type=group["proj_type"])
        projector.ortho_matrix = list(ortho.unbind(0)) if group["proj_type"] == "full" else ortho
        entry["projector"] = projector
