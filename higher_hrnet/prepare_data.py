"""Unpack datasets you already downloaded into the layouts the scripts read: offline, resumable, with progress bars.

  python higher_hrnet/prepare_data.py coco --src ~/Downloads        # train2017.zip val2017.zip annotations_trainval2017.zip
  python higher_hrnet/prepare_data.py imagenet --src ~/Downloads/imagenet-object-localization-challenge.zip
  python higher_hrnet/prepare_data.py crowdpose --src ~/Downloads/crowdpose   # images.zip + crowdpose_*.json
  python higher_hrnet/prepare_data.py                               # looks for those archives in . and ~/Downloads
Results go to <root>/data/{coco,imagenet,crowdpose} (root: --out, else $POSE_OUTPUT_ROOT, else .) or --dest:
coco/images/{train2017,val2017}/ + coco/annotations/; imagenet/{train,val}/<wnid>/ + LOC_synset_mapping.txt
(validation images sorted into class folders by LOC_val_solution.csv); crowdpose/images/ + crowdpose/annotations/.
An extracted folder works wherever an archive does. Files already in place (same size) are skipped.
"""

import argparse
import csv
import io
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from common.runs import data_dir

# Each COCO archive and the folder it extracts to (an extracted folder is accepted instead).
COCO_ARCHIVES = {"train2017.zip": "train2017", "val2017.zip": "val2017",
                 "annotations_trainval2017.zip": "annotations", "test2017.zip": "test2017",
                 "image_info_test2017.zip": None}
COCO_REQUIRED = ("train2017.zip", "val2017.zip", "annotations_trainval2017.zip")
IMAGENET_ARCHIVE = "imagenet-object-localization-challenge.zip"
IMAGENET_PREFIX = "ILSVRC/Data/CLS-LOC/"


class Source:
    """Uniform read access to a zip archive or an extracted folder: relative posix names -> bytes."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise SystemExit(f"{self.path}: not found")
        self.zip = None
        if self.path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise SystemExit(f"{self.path}: not a zip archive (damaged or incomplete download?)") from None
            self.sizes = {i.filename: i.file_size for i in self.zip.infolist() if not i.is_dir()}
        else:
            self.sizes = {p.relative_to(self.path).as_posix(): p.stat().st_size
                          for p in self.path.rglob("*") if p.is_file()}

    def names(self):
        return list(self.sizes)

    def open(self, name):
        return self.zip.open(name) if self.zip else open(self.path / name, "rb")

    def read_text(self, name):
        with self.open(name) as f:
            return io.TextIOWrapper(f, encoding="utf-8").read()

    def find(self, basename):
        """The member whose last path component is `basename` (shortest path wins), or None."""
        hits = sorted((n for n in self.sizes if PurePosixPath(n).name == basename), key=len)
        return hits[0] if hits else None


def _safe_target(dest_root, relative):
    # Refuse names that would escape the destination (absolute paths, '..').
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        return None
    return Path(dest_root, *parts)


def copy_members(source, plan, desc):
    """Copy (member name -> target path) pairs with a byte progress bar; skip complete files.

    Each file is written to `<target>.part` and renamed, so an interrupted run leaves no half
    files under their final names and a rerun picks up where it stopped.
    """
    todo = [(name, target) for name, target in plan
            if not (target.is_file() and target.stat().st_size == source.sizes[name])]
    skipped = len(plan) - len(todo)
    total = sum(source.sizes[name] for name, _ in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True) as bar:
        for name, target in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            with source.open(name) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.replace(target)
            bar.update(source.sizes[name])
    return len(todo), skipped


def prepare_coco(src_dir, dest):
    """COCO 2017 zips -> dest/images/<split>2017/*.jpg and dest/annotations/*.json."""
    src_dir = Path(src_dir).expanduser()
    def located(archive):
        folder = COCO_ARCHIVES[archive]
        if (src_dir / archive).is_file():
            return src_dir / archive
        return src_dir / folder if folder and (src_dir / folder).is_dir() else None

    missing = [a for a in COCO_REQUIRED if located(a) is None]
    if missing:
        raise SystemExit(f"{src_dir}: missing {', '.join(missing)} (the COCO 2017 downloads)")
    written = skipped = 0
    for archive in COCO_ARCHIVES:
        path = located(archive)
        if path is None:
            continue
        source = Source(path)
        is_annotations = archive.startswith(("annotations", "image_info"))
        plan = []
        for name in source.names():
            # In an extracted folder the names lack the folder itself; the zips include it.
            name_in_zip = f"{path.name}/{name}" if path.is_dir() else name
            if is_annotations and not name_in_zip.endswith(".json"):
                continue
            root = dest if is_annotations else dest / "images"
            target = _safe_target(root, name_in_zip)
            if target is None:
                print(f"warning: {path}: skipping unsafe member name {name!r}")
                continue
            plan.append((name, target))
        n, s = copy_members(source, plan, archive)
        written, skipped = written + n, skipped + s
    print(f"COCO: {written} files written, {skipped} already in place")
    return dest


def prepare_imagenet(src, dest):
    """ImageNet Kaggle archive -> dest/train/<wnid>/*.JPEG, dest/val/<wnid>/*.JPEG."""
    source = Source(src)
    synsets, solution = source.find("LOC_synset_mapping.txt"), source.find("LOC_val_solution.csv")
    if synsets is None or solution is None:
        raise SystemExit(f"{source.path}: LOC_synset_mapping.txt / LOC_val_solution.csv not found "
                         f"(expected the Kaggle imagenet-object-localization-challenge archive)")
    wnids = [line.split()[0] for line in source.read_text(synsets).splitlines() if line.strip()]
    known = set(wnids)
    val_class = {}
    for row in csv.DictReader(io.StringIO(source.read_text(solution))):
        wnid = row["PredictionString"].split()[0]
        if wnid not in known:
            raise SystemExit(f"{source.path}: {solution}: image {row['ImageId']} has unknown class {wnid}")
        val_class[row["ImageId"]] = wnid

    names = source.names()
    prefix = next((n[:n.index(IMAGENET_PREFIX) + len(IMAGENET_PREFIX)] for n in names
                   if IMAGENET_PREFIX in n), None)
    if prefix is None:
        raise SystemExit(f"{source.path}: no {IMAGENET_PREFIX} folder (expected the Kaggle ImageNet archive)")
    train_plan, val_plan, unlabelled = [], [], 0
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("/")
        if parts[0] == "train" and len(parts) == 3 and parts[1] in known:
            train_plan.append((name, dest / "train" / parts[1] / parts[2]))
        elif parts[0] == "val" and len(parts) == 2:
            image_id = PurePosixPath(parts[1]).stem
            if image_id in val_class:
                val_plan.append((name, dest / "val" / val_class[image_id] / parts[1]))
            else:
                unlabelled += 1
    if unlabelled:
        print(f"warning: {unlabelled} validation images have no row in {solution}; left out")
    n_train, s_train = copy_members(source, train_plan, "ImageNet train")
    n_val, s_val = copy_members(source, val_plan, "ImageNet val")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "LOC_synset_mapping.txt").write_text(source.read_text(synsets))
    print(f"ImageNet: {len(train_plan)} train and {len(val_plan)} val images in {len(wnids)} classes "
          f"({n_train + n_val} written, {s_train + s_val} already in place)")
    return dest


def prepare_crowdpose(src_dir, dest):
    """CrowdPose images.zip + crowdpose_{train,val,test,trainval}.json -> dest/images, dest/annotations."""
    src_dir = Path(src_dir).expanduser()
    images = src_dir / "images.zip" if (src_dir / "images.zip").exists() else src_dir / "images"
    jsons = sorted(src_dir.glob("crowdpose_*.json"))
    if not images.exists() or not jsons:
        raise SystemExit(f"{src_dir}: expected images.zip (or images/) and crowdpose_*.json")
    source = Source(images)
    plan = []
    for name in source.names():
        relative = name if images.is_dir() else name.split("/", 1)[-1] if name.startswith("images/") else name
        target = _safe_target(dest / "images", relative)
        if target is not None:
            plan.append((name, target))
    copy_members(source, plan, "CrowdPose images")
    (dest / "annotations").mkdir(parents=True, exist_ok=True)
    for path in jsons:
        shutil.copyfile(path, dest / "annotations" / path.name)
    print(f"CrowdPose: {len(plan)} images, annotations {', '.join(p.name for p in jsons)}")
    return dest


def find_archives(folders):
    """First (kind, source) found in `folders` for the no-argument run."""
    for folder in folders:
        folder = Path(folder).expanduser()
        if all((folder / a).is_file() for a in COCO_REQUIRED):
            return "coco", folder
        if (folder / IMAGENET_ARCHIVE).is_file():
            return "imagenet", folder / IMAGENET_ARCHIVE
    return None, None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=("coco", "imagenet", "crowdpose"),
                        help="what to prepare (default: whatever archives are found in . or ~/Downloads)")
    parser.add_argument("--src", default=None, help="the archive (imagenet) or the folder holding the archives")
    parser.add_argument("--dest", default=None, help="output folder (default: <root>/data/<dataset>)")
    parser.add_argument("--out", default=None, help="root folder (default: $POSE_OUTPUT_ROOT, else .)")
    return parser.parse_args(argv)


def main(args):
    kind, src = args.dataset, args.src
    if kind is None or src is None:
        found_kind, found_src = find_archives([src] if src else [".", "~/Downloads"])
        if found_kind is None or (kind and kind != found_kind):
            print("no dataset archives found: run `prepare_data.py coco --src DIR` (train2017.zip, val2017.zip, "
                  f"annotations_trainval2017.zip) or `prepare_data.py imagenet --src {IMAGENET_ARCHIVE}`")
            return 1
        kind, src = found_kind, found_src
    dest = Path(args.dest) if args.dest else data_dir(args.out) / kind
    prepare = {"coco": prepare_coco, "imagenet": prepare_imagenet, "crowdpose": prepare_crowdpose}[kind]
    prepare(src, dest)
    print(f"{kind} prepared in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
