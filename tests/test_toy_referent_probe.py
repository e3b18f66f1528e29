"""Issue 23's referent probe: questions drawn as the datasets draw them, objects on the MLLM's grid, and a
probe that finds a planted signal and nothing where there is none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lens_manifests.synthetic.language import reason_candidates, refer_sentences
from lens_toy.referent_probe import (
    TASKS,
    ProbeItem,
    accuracy,
    descriptors,
    draw_question,
    fit_probe,
    probe_item,
    probe_layer,
)


@pytest.mark.parametrize("task", TASKS)
def test_questions_pick_out_their_referents_and_are_seeded(task):
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene, question, ignores = draw_question(task, rng)
        shapes = scene.shapes
        assert question.targets and set(question.targets).isdisjoint(ignores)
        if task == "semantic":  # a class name: every shape of the kind, and only those
            assert {i for i, s in enumerate(shapes) if s.kind == question.text} == set(question.targets)
        elif task == "referring":  # a phrase that singles out exactly its shape
            (i,) = question.targets
            assert question.text in refer_sentences(scene, i)
            assert all(question.text not in refer_sentences(scene, j) for j in range(len(shapes)) if j != i)
        else:
            assert any(question.text in q.texts and q.targets == question.targets for q in reason_candidates(scene))
    a = draw_question(task, np.random.default_rng(9))
    b = draw_question(task, np.random.default_rng(9))
    assert a[1] == b[1] and np.array_equal(a[0].image, b[0].image)


def test_probe_item_reads_the_last_prompt_token_and_the_objects_cells():
    from lens_cache.backbones import build_mllm
    from lens_cache.backbones.geometry import sam_frame
    from PIL import Image

    mllm = build_mllm("tiny", layers=[1, 2])
    scene, question, ignores = draw_question("referring", np.random.default_rng(1))
    item = probe_item(mllm, "referring", scene, question, ignores)
    grid = int(np.sqrt(mllm.num_image_tokens))
    n = len(scene.shapes)
    assert item.cells.shape == (n, grid * grid) and torch.allclose(item.cells.sum(1), torch.ones(n))
    frame = sam_frame(Image.fromarray(scene.image))
    states = mllm.encode([frame.padded_image()], [[item.question]])[0]
    for k in (1, 2):
        assert item.state[k].shape == (mllm.hidden_size,)
        torch.testing.assert_close(item.state[k], states.text_states[0][k][-1].float())
        mean = probe_item(mllm, "referring", scene, question, ignores, token="mean").state[k]
        torch.testing.assert_close(mean, states.text_states[0][k].float().mean(0))
        # an object's state is the coverage-weighted mean of the image tokens under it (independent sum)
        i = question.targets[0]
        w = item.cells[i]
        expected = sum(w[c] * states.image_states[k][c].float() for c in torch.nonzero(w).flatten())
        torch.testing.assert_close(item.object_states[k][i], expected, atol=1e-5, rtol=1e-4)
    # the object's cells lie where its mask is: its centre's cell carries weight, and its geometry is its
    # centre and size in frame units (independently: from the mask's pixels)
    scale = 1024 / max(scene.width, scene.height)
    cx, cy = (c * scale / 1024 for c in scene.shapes[i].centre)
    assert item.cells[i, int(cy * grid) * grid + int(cx * grid)] > 0
    torch.testing.assert_close(item.geometry[i, :2], torch.tensor([cx, cy]), atol=0.6 / grid, rtol=0)
    side = (scene.shapes[i].area * scale**2 / 1024**2) ** 0.5
    assert abs(float(item.geometry[i, 2]) - side) < 0.15 * side


def _planted(count: int, seed: int, informative: bool) -> list[ProbeItem]:
    """Queries whose referent is the object with the largest <h, A o>, for a fixed hidden A (or, when not
    informative, a referent drawn at random whatever h says)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    items = []
    for _ in range(count):
        n = int(torch.randint(2, 6, (1,), generator=g))
        h, objects = torch.randn(8, generator=g), torch.randn(n, 6, generator=g)
        target = int((objects @ (hidden.T @ h)).argmax()) if informative else int(torch.randint(n, (1,), generator=g))
        cells = torch.softmax(torch.randn(n, 16, generator=g), dim=1)
        geometry = torch.rand(n, 3, generator=g)
        items.append(ProbeItem("referring", "", "", {1: h}, {1: objects}, cells, geometry, (target,)))
    return items


def test_the_probe_finds_a_planted_referent_and_nothing_in_noise():
    train, held = _planted(600, 1, True), _planted(300, 2, True)
    result = probe_layer(train, held, layer=1, kind="what")
    assert result["accuracy"] > 0.85  # chance is about 0.3 (2-5 objects)
    noise_train, noise_held = _planted(600, 1, False), _planted(300, 2, False)
    chance = float(np.mean([1 / len(i.cells) for i in noise_held]))
    assert abs(probe_layer(noise_train, noise_held, layer=1, kind="what")["accuracy"] - chance) < 0.1
    # the "where" descriptor carries no planted signal here, and a blind probe cannot read h: near chance
    assert probe_layer(train, held, layer=1, kind="where")["accuracy"] < 0.5
    assert probe_layer(train, held, layer=1, kind="what", blind=True)["accuracy"] < 0.5


def test_fit_is_deterministic_and_padding_never_wins():
    items = _planted(100, 3, True)
    data = descriptors(items, 1, "both")
    a, b = fit_probe(*data, ridge=1e-2), fit_probe(*data, ridge=1e-2)
    assert torch.equal(a.weight, b.weight)
    h, objects, valid, targets, _ = data
    best = a.scores(h, objects, valid).argmax(1)
    assert bool(valid[torch.arange(len(best)), best].all())
    assert accuracy(a, *data) > 0.8


def test_cli_writes_the_table_the_json_and_the_figure(tmp_path):
    from lens_toy.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["probe-referent", "--mllm", "tiny", "--layers", "1,2", "--lens-layer", "2",
                                      "--train-scenes", "10", "--held-out-scenes", "5", "--out", str(tmp_path),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "probe.json").read_text())
    assert set(report["tasks"]) == set(TASKS) and report["layers"] == [1, 2]
    for row in report["tasks"].values():
        assert 0 < row["chance"] <= 1 and 0 <= row["prior"] <= 1
        assert set(row["by_layer"]) == {"1", "2"}
    assert "layer 2 (LENS)" in (tmp_path / "probe.md").read_text()
    assert (tmp_path / "probe.png").stat().st_size > 1000


def test_word_share_is_between_group_variance_and_the_oracle_reads_the_text():
    from lens_toy.referent_probe import text_oracle, word_share

    g = torch.Generator().manual_seed(4)
    centres = {"circle": torch.randn(6, generator=g) * 3, "star": torch.randn(6, generator=g) * 3}
    items = []
    for q in range(200):
        text = "circle" if q % 2 else "star"
        state = centres[text] + torch.randn(6, generator=g)
        objects = torch.eye(6)[:3] if text == "circle" else torch.eye(6)[3:]  # the referent: object 0 / 2
        target = 0 if text == "circle" else 2
        items.append(ProbeItem("semantic", "", text, {1: state}, {1: objects}, torch.full((3, 4), 0.25),
                               torch.rand(3, 3, generator=g), (target,)))
    states = torch.stack([i.state[1] for i in items])
    labels = torch.tensor([i.text == "circle" for i in items])
    means = torch.stack([states[labels].mean(0), states[~labels].mean(0)])
    within = sum((states[labels == b] - means[i]).pow(2).sum() for i, b in enumerate((True, False)))
    expected = 1 - within / (states - states.mean(0)).pow(2).sum()  # independent: 1 - within / total
    assert abs(word_share(items, 1) - float(expected)) < 1e-5 and word_share(items, 1) > 0.7
    assert text_oracle(items[:150], items[150:], 1) == 1.0
