"""The one pretrained-weights policy every script follows (`--pretrained none|imagenet|PATH`).

"none" (the default) touches nothing. "imagenet" reads the torch hub cache ($TORCH_HOME/hub/checkpoints/<filename>)
or downloads into it; when neither works the run stops with one line naming the file it needs and the two ways
out. A path loads that file. There is no silent fall-back.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.runs import load_checkpoint


def resolve_pretrained(spec, *, filename: str, url: str | None = None, load_fn) -> Path | None:
    """Load `spec`'s weights with load_fn(state_dict); returns the file used, or None for "none".

    filename: the ImageNet weights' file name in the torch hub cache (e.g. "resnet50-0676ba61.pth"); url: where
    to download it from (None: cache only). A PATH may hold a state dict, {"state_dict": ...} or one of our
    checkpoints (its "model").
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    if str(spec).lower() == "imagenet":
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        reason = "no download URL is known for it"
        if not path.is_file() and url is not None:
            try:    # downloads into exactly `path` (torch.hub keeps the file name it is given)
                torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent), file_name=filename,
                                                   map_location="cpu", progress=False, weights_only=True)
            except Exception as exc:  # offline, proxy refused, HTTP error, partial file ...
                reason = f"download failed: {type(exc).__name__}: {exc}".replace("\n", " ")
        if not path.is_file():
            raise SystemExit(f"--pretrained imagenet needs {path} ({reason}); copy that file there, "
                             f"or use --pretrained none (train from scratch) or --pretrained PATH (a weights file)")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SystemExit(f"--pretrained {spec}: no such file (use --pretrained none, imagenet or PATH)")
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise SystemExit(f"--pretrained {path}: expected a state dict, found {type(state).__name__}")
    load_fn(next((state[key] for key in ("model", "state_dict") if isinstance(state.get(key), dict)), state))
    print(f"pretrained weights: loaded {path}")
    return path
