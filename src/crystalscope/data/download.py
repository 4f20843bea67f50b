"""`crystalscope data download`: the public OpenCrystalData cephalexin set from Kaggle.

kagglehub downloads and unpacks the set into a hidden folder beside DEST, which is renamed to
DEST only once it is complete: an interrupted download never leaves a folder that looks
finished. The set is public, so the download is tried with or without Kaggle credentials; when
it fails (offline, or Kaggle asks for an account), the error says what to set and how to
download and place the files by hand.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from crystalscope.data.layout import read_class_folders
from crystalscope.errors import CrystalscopeError, UserError

KAGGLE_DATASET = "opencrystaldata/cephalexin-reactive-crystallization"
KAGGLE_PAGE = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"


def manual_steps(dest: Path) -> str:
    """The steps to get the data without kagglehub."""
    return (
        f"download the archive by hand from {KAGGLE_PAGE} (Download button, free Kaggle "
        f"account), unzip it and put its folder at {dest} (it holds cropped/cropped/cex and "
        f"cropped/cropped/pg); or set KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json) "
        "and run this command again"
    )


def kaggle_credentials_present() -> bool:
    """True if kagglehub can find credentials: environment variables or kaggle.json."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def download_dataset(dest: Path, *, handle: str = KAGGLE_DATASET) -> Path:
    """Download the data set into ``dest`` and return the folder that holds its class folders."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest}: is not empty; choose a new folder for the download")
    import kagglehub  # imported here: it is slow to import and only this command needs it

    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        kagglehub.dataset_download(handle, output_dir=str(partial), force_download=True)
        classes = read_class_folders(partial)
    except UserError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise CrystalscopeError(f"the download did not hold class folders ({exc})") from exc
    except Exception as exc:  # network, authentication, disk: all end the same way
        shutil.rmtree(partial, ignore_errors=True)
        hint = ("" if kaggle_credentials_present() else
                "no Kaggle credentials were found (if Kaggle asks for an account, set "
                "KAGGLE_USERNAME and KAGGLE_KEY or put kaggle.json in ~/.kaggle); ")
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CrystalscopeError(
            f"download of {handle} failed ({type(exc).__name__}: {reason}); {hint}"
            f"{manual_steps(dest)}") from exc
    if dest.exists():
        dest.rmdir()  # empty, checked above
    partial.rename(dest)
    return dest / classes[0].path.parent.relative_to(partial)
