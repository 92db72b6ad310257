"""Loading weights into the HRNet models: official releases, the seed's checkpoints, ImageNet backbones.

Official files come in several forms (wrapped in `state_dict`/`model`, names prefixed `module.` or,
for the fp16 640 releases, `1.`, weights in float16); `load_official_checkpoint` accepts all of them.
Every file is read with `torch.load(..., weights_only=True)`. Errors are one line naming the file.
"""

import pickle
import re
from pathlib import Path

import torch

from common.data import BadInput
from common.keypoints import COCO17, get_layout
from common.runs import load_checkpoint, load_tensors, model_from_checkpoint, require
from higher_hrnet.dataset import LAYOUTS, target_codecs
from higher_hrnet.model import MODEL_NAME, build_model

# Keys of a wrapper dict that hold the weights one level down, in the order they are tried:
# official releases (`state_dict`), our checkpoints (`model`), the seed (`module` -> `model`).
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")

# Parts of HigherHRNet that an ImageNet ClassificationHRNet does not have.
POSE_HEAD_PREFIXES = ("final_layers.", "deconv_layers.")


class CheckpointError(BadInput, ValueError):
    """A checkpoint that does not fit the model; the message is one line naming the file."""


def _describe(source):
    return str(source) if isinstance(source, (str, Path)) else "<state dict>"


def _unwrap(obj, source):
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(f"{_describe(source)}: no weights found (top-level keys: "
                                  f"{', '.join(map(str, list(obj)[:8]))})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{_describe(source)}: expected a state dict, found {type(obj).__name__}")
    return obj


def _strip_prefix(state_dict, prefix):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}, True
    return state_dict, False


def read_state_dict(path_or_state_dict, name=None):
    """Any supported checkpoint -> plain {official name: float32 tensor}.

    Wrappers and prefixes are removed: `module.` comes from DataParallel/DDP saves, `1.` from the
    official fp16 releases, which wrap the model as nn.Sequential(to_fp16, model) and so store
    every name under index 1. The seed's names are translated to the official ones. `name` is
    what error messages call an in-memory checkpoint (e.g. the file it was read from).
    """
    source = path_or_state_dict if name is None else name
    if isinstance(path_or_state_dict, (str, Path)):
        if not Path(source).is_file():
            raise CheckpointError(f"{source}: checkpoint file not found")
        try:
            obj = load_tensors(source)
        except pickle.UnpicklingError:  # torch's message suggests weights_only=False, the unsafe way out
            raise CheckpointError(f"{source}: cannot be read with weights_only=True: not a torch.save file, or it "
                                  "holds objects other than tensors and plain types (refused)") from None
        except Exception as exc:  # a truncated or damaged archive ...
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{source}: cannot be read with weights_only=True ({first_line})") \
                from None
    else:
        obj = path_or_state_dict
    state_dict = dict(_unwrap(obj, source))
    stripped = True
    while stripped:
        state_dict, stripped_module = _strip_prefix(state_dict, "module.")
        state_dict, stripped_fp16 = _strip_prefix(state_dict, "1.")
        stripped = stripped_module or stripped_fp16
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    if is_seed_state_dict(state_dict):
        try:
            state_dict = convert_seed_state_dict(state_dict)
        except CheckpointError as error:
            raise CheckpointError(f"{_describe(source)}: {error}") from None
    return state_dict


def is_seed_state_dict(state_dict):
    return any(k.startswith(("backbone.stages.", "init_heatmaps_head.", "classification_head."))
               for k in state_dict)


# The seed's module tree maps one to one onto the official one; each rule rewrites a name prefix.
# In the seed, stages.0 is layer1 and stages.s (s >= 1) is stage{s+1}; a stage's HighResolution
# blocks and fusion layers alternate in `blocks` (2m: branches of module m, 2m+1: its fusion), and
# its transition_layer leads into the next stage, i.e. official transition{s+1}.
_SEED_RULES = [
    (r"backbone\.stages\.0\.blocks\.0\.scales_blocks\.0\.", lambda m: "layer1."),
    (r"backbone\.stages\.(\d+)\.transition_layer\.transition_blocks\.(\d+)\.",
     lambda m: _seed_transition(int(m[1]), int(m[2]))),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.scales_blocks\.(\d+)\.",
     lambda m: f"stage{int(m[1]) + 1}.{int(m[2]) // 2}.branches.{m[3]}."),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.scales_fusion_layers\.(\d+)\.(\d+)\.",
     lambda m: f"stage{int(m[1]) + 1}.{int(m[2]) // 2}.fuse_layers.{m[3]}.{m[4]}."),
    (r"backbone\.(conv1|bn1|conv2|bn2)\.", lambda m: f"{m[1]}."),
    (r"init_heatmaps_head\.", lambda m: "final_layers.0."),
    (r"deconv_layers\.(\d+)\.deconv\.", lambda m: f"deconv_layers.{m[1]}.0."),
    (r"deconv_layers\.(\d+)\.resid_blocks\.(\d+)\.",
     lambda m: f"deconv_layers.{m[1]}.{int(m[2]) + 1}.0."),
    (r"deconv_layers\.(\d+)\.final_layer\.", lambda m: f"final_layers.{int(m[1]) + 1}."),
    (r"(?:classification_head\.)?chann_incr_blocks\.(\d+)\.", lambda m: f"incre_modules.{m[1]}.0."),
    (r"(?:classification_head\.)?downsample_blocks\.(\d+)\.", lambda m: f"downsamp_modules.{m[1]}."),
    (r"(?:classification_head\.)?final_conv\.", lambda m: "final_layer."),
    (r"(?:classification_head\.)?classifier\.", lambda m: "classifier."),
]
_SEED_RULES = [(re.compile(pattern), rewrite) for pattern, rewrite in _SEED_RULES]


def _seed_transition(seed_stage, index):
    # Transition s leads from a stage with s+1 branches; index s+1 is the new lower-resolution
    # branch, which the official code wraps in one more Sequential (`.{i}.0`).
    new_branch = index == seed_stage + 1
    return f"transition{seed_stage + 1}.{index}." + ("0." if new_branch else "")


def convert_seed_state_dict(state_dict):
    """Rename a seed checkpoint's weights (`hrnet_32.pt`, `higher_hrnet_32.pt`) to official names."""
    converted = {}
    for name, value in state_dict.items():
        for pattern, rewrite in _SEED_RULES:
            match = pattern.match(name)
            if match:
                converted[rewrite(match) + name[match.end():]] = value
                break
        else:
            raise CheckpointError(f"seed checkpoint: no official name for '{name}'")
    return converted


def checkpoint_width(state_dict):
    """Branch-0 width of an HRNet state dict (32 for W32), or None if it cannot be told."""
    weight = state_dict.get("transition1.0.0.weight")
    return None if weight is None else int(weight.shape[0])


def _on_meta(model):
    # A model built on the meta device takes the file's tensors as its own (a fast way to
    # materialise a big model); otherwise the values are copied into the existing tensors.
    return any(t.is_meta for t in model.state_dict().values())


def _check_shapes(model, state_dict, source, names):
    own = model.state_dict()
    mismatched = [n for n in names if tuple(own[n].shape) != tuple(state_dict[n].shape)]
    if not mismatched:
        return
    theirs, ours = checkpoint_width(state_dict), checkpoint_width(own)
    if theirs is not None and ours is not None and theirs != ours:
        raise CheckpointError(f"{_describe(source)}: checkpoint is HRNet-W{theirs} but the model is "
                              f"W{ours}; build the model with width={theirs}")
    n = mismatched[0]
    raise CheckpointError(f"{_describe(source)}: {len(mismatched)} shape mismatches, first '{n}' "
                          f"{tuple(state_dict[n].shape)} vs model {tuple(own[n].shape)}")


def load_official_checkpoint(model, path_or_state_dict):
    """Load official HigherHRNet / ClassificationHRNet weights (or the seed's) into `model`, strictly.

    Only BatchNorm `num_batches_tracked` counters may be missing (older releases lack them).
    Returns the model. Raises CheckpointError with one line on any other difference.
    """
    source = path_or_state_dict
    state_dict = read_state_dict(source)
    own = model.state_dict()
    missing = [n for n in own if n not in state_dict and not n.endswith("num_batches_tracked")]
    unexpected = [n for n in state_dict if n not in own]
    if missing or unexpected:
        theirs, ours = checkpoint_width(state_dict), checkpoint_width(own)
        if theirs is not None and ours is not None and theirs != ours:
            raise CheckpointError(f"{_describe(source)}: checkpoint is HRNet-W{theirs} but the model "
                                  f"is W{ours}; build the model with width={theirs}")
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (first '{missing[0]}')")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (first '{unexpected[0]}')")
        raise CheckpointError(f"{_describe(source)}: does not match {type(model).__name__}: "
                              + ", ".join(detail))
    _check_shapes(model, state_dict, source, list(state_dict))
    model.load_state_dict(state_dict, strict=False, assign=_on_meta(model))
    return model


def load_imagenet_backbone(model, path_or_state_dict, name=None):
    """Initialise a HigherHRNet's backbone from an ImageNet ClassificationHRNet checkpoint by name.

    Accepts the official `hrnetv2_w32_imagenet_pretrained.pth`, a `train_classification.py`
    checkpoint or the seed's `hrnet_32.pt`. Every backbone tensor must be present with the right
    shape (1,752 of HigherHRNet's 1,810 entries: all but final_layers/deconv_layers); the
    classification head is ignored. Returns the number of tensors loaded. `name`: what errors call an in-memory
    state dict (read_state_dict's).
    """
    source = path_or_state_dict if name is None else name
    state_dict = read_state_dict(path_or_state_dict, name)
    own = model.state_dict()
    wanted = [n for n in own if not n.startswith(POSE_HEAD_PREFIXES)]
    missing = [n for n in wanted if n not in state_dict and not n.endswith("num_batches_tracked")]
    if missing:
        theirs, ours = checkpoint_width(state_dict), checkpoint_width(own)
        if theirs is not None and ours is not None and theirs != ours:
            raise CheckpointError(f"{_describe(source)}: checkpoint is HRNet-W{theirs} but the model "
                                  f"is W{ours}; build the model with width={theirs}")
        raise CheckpointError(f"{_describe(source)}: not an HRNet backbone: {len(missing)} backbone "
                              f"weights missing (first '{missing[0]}')")
    present = [n for n in wanted if n in state_dict]
    _check_shapes(model, state_dict, source, present)
    model.load_state_dict({n: state_dict[n] for n in present}, strict=False, assign=_on_meta(model))
    return len(present)


def higher_hrnet_config(state_dict):
    """(width, num_joints, tag_per_joint) of a HigherHRNet state dict with official names."""
    try:
        num_joints = state_dict["final_layers.1.weight"].shape[0]
        quarter_channels = state_dict["final_layers.0.weight"].shape[0]
        width = checkpoint_width(state_dict)
    except KeyError as missing:
        raise CheckpointError(f"not a HigherHRNet state dict (no {missing})") from None
    if width is None:
        raise CheckpointError("not a HigherHRNet state dict (no transition1.0.0.weight)")
    return width, num_joints, quarter_channels == 2 * num_joints


def load_higher_hrnet(path_or_state_dict):
    """A HigherHRNet built to fit the checkpoint (width, joints, tag channels) with its weights loaded:
    our checkpoints, official releases in any form, or the seed's."""
    state_dict = read_state_dict(path_or_state_dict)
    try:
        width, num_joints, tag_per_joint = higher_hrnet_config(state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{_describe(path_or_state_dict)}: {error}") from None
    return load_official_checkpoint(build_model(width, num_joints, tag_per_joint), state_dict)


def upgrade_checkpoint(checkpoint, path) -> dict:
    """A checkpoint written before arch and settings had their own keys: the architecture follows from the
    weights' shapes, the input size and layout were flags in its "config", sigma was always 2."""
    config = require(checkpoint, "config", path)
    width, num_joints, tag_per_joint = higher_hrnet_config(read_state_dict(require(checkpoint, "model", path)))
    input_size = require(config, "input_size", path)
    settings = {"input_size": input_size, "codecs": [c.as_dict() for c in target_codecs(input_size, 2.0)],
                "layout": get_layout(require(config, "layout", path), LAYOUTS).as_dict()}
    return {**checkpoint, "arch": {"width": width, "num_joints": num_joints, "tag_per_joint": tag_per_joint},
            "settings": settings}


def load_for_inference(path, device="cpu"):
    """(model in eval mode, settings) of any supported file: ours rebuilt from its arch with its settings;
    an official release or the seed's built from its weights' shapes (settings: COCO-17, no input size)."""
    contents = load_checkpoint(path)
    if isinstance(contents, dict) and contents.get("model_name") == MODEL_NAME:
        model, checkpoint = model_from_checkpoint(path, build_model, MODEL_NAME, upgrade_checkpoint, device,
                                                  checkpoint=contents)
        return model, checkpoint["settings"]
    try:
        model = load_higher_hrnet(path)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    return model.to(device).eval(), {"input_size": None, "layout": COCO17.as_dict()}
