"""Learning-rate schedule and resumable training state (adapter weights, optimizer, scheduler) on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..core.checkpoint import save_safetensors


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def save_tensors_and_state(optimizer, scheduler, folder: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    save_safetensors(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer_state.json").write_text(
        json.dumps({"param_groups": state["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict()})
    )


def load_tensors_and_state(optimizer, scheduler, folder: Path) -> None:
    meta = json.loads((folder / "optimizer_state.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in load_file(folder / "optimizer.safetensors").items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])


def find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    if spec != "latest":
        return Path(spec)
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


__all__ = ["find_checkpoint", "load_tensors_and_state", "lr_lambda", "save_tensors_and_state"]
