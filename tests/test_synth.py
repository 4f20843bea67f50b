import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.feature import hog, local_binary_pattern
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from crystalscope.data.dedupe import dihedral_arrays
from crystalscope.errors import UserError
from crystalscope.settings import SettingsError
from crystalscope.synth.crops import SynthSettings, parse_difficulty, render_group, synthesize
from crystalscope.synth.scenes import (
    FAINT_KINDS,
    FULL_RANGE_DIFFICULTY,
    PARTICLE_KINDS,
    PARTICLE_ODDS,
    particle,
    particle_odds,
)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    settings = SynthSettings(per_class=6, size=48, dihedral_copies=1, seed=4)
    synthesize(tmp_path / "a", settings, workers=1)
    synthesize(tmp_path / "b", settings, workers=2)
    synthesize(tmp_path / "c", SynthSettings(per_class=6, size=48, dihedral_copies=1, seed=5),
               workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 12
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert any((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes()
               for n in files)


def test_names_sizes_and_modes_follow_the_public_data(tmp_path: Path) -> None:
    summary = synthesize(tmp_path / "s", SynthSettings(per_class=30, seed=1), workers=1)
    cex = [Image.open(tmp_path / "s" / "cex" / f"CEX ({n}).png") for n in range(1, 31)]
    pg = [Image.open(tmp_path / "s" / "pg" / f"PG ({n}).png") for n in range(1, 31)]
    assert {im.size for im in cex} == {(151, 151)}
    assert all(im.mode == "L" for im in cex + pg)
    sides = [side for im in pg for side in im.size]
    assert min(sides) >= 131 and max(sides) <= 230 and len(set(sides)) > 10
    assert json.loads((tmp_path / "s" / "synth.json").read_text()) == summary


def test_uniform_size_removes_size_as_a_shortcut(tmp_path: Path) -> None:
    synthesize(tmp_path / "u", SynthSettings(per_class=8, uniform_size=64), workers=1)
    assert {Image.open(p).size for p in (tmp_path / "u").rglob("*.png")} == {(64, 64)}


def test_dihedral_copies_are_exact_rotations_with_consecutive_numbers(tmp_path: Path) -> None:
    synthesize(tmp_path / "d", SynthSettings(per_class=8, size=48, dihedral_copies=3), workers=1)
    folder = tmp_path / "d" / "pg"
    first = np.asarray(Image.open(folder / "PG (1).png"))
    variants = [v.tobytes() for v in dihedral_arrays(first)]
    for number in (2, 3, 4):
        copy = np.asarray(Image.open(folder / f"PG ({number}).png"))
        assert copy.tobytes() in variants and copy.tobytes() != first.tobytes()
    fifth = np.asarray(Image.open(folder / "PG (5).png"))
    assert fifth.tobytes() not in variants
    cex = [np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "d" / "cex").glob("*.png")]
    assert len(set(cex)) == 8  # CEX gets no copies


def _pixel_statistics(image: np.ndarray) -> list[float]:
    a = image.astype(np.float32)
    return [a.mean(), a.std(), *np.percentile(a, [5, 25, 50, 75, 95, 99]),
            (a > 200).mean(), (a > 240).mean()]


def _texture_features(image: np.ndarray) -> list[float]:
    """Pixel statistics plus how lines and textures look: gradient orientation coherence
    (HOG cells), gradient percentiles and LBP histograms at three radii."""
    a = image.astype(np.float32)
    cells = hog(a, orientations=8, pixels_per_cell=(16, 16), cells_per_block=(1, 1))
    cells = cells.reshape(-1, 8)
    coherence = cells.max(axis=1) / (cells.sum(axis=1) + 1e-6)
    textures = []
    for radius in (1, 3, 6):
        codes = local_binary_pattern(image, 8, radius, method="uniform").astype(int)
        textures.extend(np.bincount(codes.ravel(), minlength=10) / codes.size)
    gradient = np.hypot(*np.gradient(a))
    return [*_pixel_statistics(image), coherence.mean(), coherence.std(),
            *np.percentile(gradient, [50, 90, 99]), *textures, *np.sort(cells.sum(axis=0))]


def _accuracy(difficulty: float, features: Callable[[np.ndarray], list[float]]) -> float:
    settings = SynthSettings(difficulty=difficulty, uniform_size=96, seed=11)
    rows, labels = [], []
    for label, name in enumerate(("cex", "pg")):
        for number in range(1, 151):
            rows.append(features(render_group(name, number, settings)[0]))
            labels.append(label)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(cross_val_score(model, np.array(rows), np.array(labels), cv=5).mean())


def test_task_is_learnable_from_shape_and_texture_and_harder_when_hard() -> None:
    easy, hard = _accuracy(0.0, _texture_features), _accuracy(1.0, _texture_features)
    assert easy >= 0.85
    assert 0.65 <= hard <= 0.95  # clearly above chance (0.5), clearly not perfect
    assert hard < easy


def test_brightness_alone_does_not_tell_the_classes_apart() -> None:
    # At the default difficulty both classes range from dim to saturated (domain
    # randomisation): a model must learn shapes and textures, which carry over to real crops,
    # not a grey level, which does not. (``easy`` draws the conspicuous, bright PG only.)
    assert _accuracy(FULL_RANGE_DIFFICULTY, _pixel_statistics) <= 0.75


def test_both_classes_span_dim_to_saturated() -> None:
    settings = SynthSettings(seed=3)
    for name in ("cex", "pg"):
        saturated = [float((render_group(name, n, settings)[0] >= 250).mean())
                     for n in range(1, 61)]
        assert min(saturated) == 0.0
        assert max(saturated) >= (0.05 if name == "pg" else 0.01)


def test_easy_draws_no_faint_particles_and_the_default_draws_every_kind() -> None:
    faint = [PARTICLE_KINDS.index(k) for k in FAINT_KINDS]
    assert all(particle_odds(0.0)[i] == 0.0 for i in faint)
    assert particle_odds(FULL_RANGE_DIFFICULTY) == particle_odds(1.0) == PARTICLE_ODDS
    shares = [sum(particle_odds(d)[i] for i in faint) for d in (0.0, 0.1, 0.2, 0.3)]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    for d in (0.0, 0.15):
        assert sum(particle_odds(d)) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", PARTICLE_KINDS)
def test_every_particle_kind_is_drawn_inside_its_mask(kind: str) -> None:
    rng = np.random.default_rng(5)
    body, alpha, mask = particle(rng, 120, 140, kind=kind, base=50.0)
    assert body.shape == alpha.shape == mask.shape == (120, 140)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    assert 0.1 < (mask > 0.5).mean() < 0.95  # one particle filling much of the crop
    assert alpha[mask > 0.5].mean() > 3 * alpha[mask < 0.01].mean()
    with pytest.raises(ValueError, match="kind"):
        particle(rng, 50, 50, kind="cube")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    assert parse_difficulty("hard") == 1.0 and parse_difficulty("0.25") == 0.25
    for text in ("extreme", "1.5"):
        with pytest.raises(SettingsError, match="difficulty") as error:
            parse_difficulty(text)
        assert error.value.for_flags().startswith("--difficulty ")
    for fields, flag in [({"per_class": 0}, "--per-class"),
                         ({"dihedral_copies": 8}, "--dihedral-copies"),
                         ({"size": 8}, "--size")]:
        with pytest.raises(SettingsError) as error:  # refused when made, not when used
            SynthSettings(**fields)
        assert error.value.field == next(iter(fields))
        assert error.value.for_flags().startswith(flag + " ")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not an empty folder"):
        synthesize(tmp_path / "full", SynthSettings(per_class=2))
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
