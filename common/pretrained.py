"""The one pretrained-weights policy every script follows (`--pretrained none|imagenet|PATH`).

Default is "none": nothing touches the network unless asked. "imagenet" reads the local torch hub cache
($TORCH_HOME/hub/checkpoints/<filename>) or downloads into it; when neither works the run stops with one
line naming the file it needs and the two ways out. A path loads that file. There is no silent fall-back.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub keeps (or would keep) a downloaded checkpoint file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _state_dict_from_file(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept our own training checkpoints and the common {"state_dict": ...} wrapper as well as bare
    # state dicts, so `--pretrained checkpoints/<model>/<run>/best.pt` works too.
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                return state[key]
    if not isinstance(state, dict):
        raise SystemExit(f"--pretrained {path}: expected a state dict, found {type(state).__name__}")
    return state


def resolve_pretrained(spec: str | os.PathLike | None, *, filename: str, url: str | None = None,
                       load_fn: Callable[[dict], object]) -> Path | None:
    """Apply the pretrained-weights policy; returns the file that was loaded, or None for "none".

    spec: "none" (or None / ""), "imagenet", or a path to a weights file.
    filename: the file name the ImageNet weights have in the torch hub cache (e.g. "resnet50-0676ba61.pth").
    url: where to download that file from; None means "cache only".
    load_fn: called with the loaded state dict (e.g. `backbone.load_state_dict`).
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None

    if str(spec).lower() == "imagenet":
        path = hub_checkpoint_path(filename)
        if not path.is_file():
            reason = "no download URL is known for it"
            if url is not None:
                try:
                    # Downloads into exactly `path` (torch.hub keeps the file name we give it).
                    torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent), file_name=filename,
                                                       map_location="cpu", progress=False, weights_only=True)
                except Exception as exc:  # offline, proxy refused, HTTP error, partial file ...
                    reason = f"download failed: {type(exc).__name__}: {exc}".replace("\n", " ")
                else:
                    reason = ""
            if not path.is_file():
                raise SystemExit(f"--pretrained imagenet needs {path} ({reason}); copy that file there, "
                                 f"or use --pretrained none (train from scratch) or --pretrained PATH (a weights file)")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SystemExit(f"--pretrained {spec}: no such file (use --pretrained none, imagenet or PATH)")

    load_fn(_state_dict_from_file(path))
    print(f"pretrained weights: loaded {path}")
    return path
