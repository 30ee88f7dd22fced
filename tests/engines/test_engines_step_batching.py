"""Step-level batching on the CPU: requests join a running batch mid-flight and leave when done."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from engines.graph_loop import EagerCapture, GraphLoop
from engines.planner import FamilyLayout, Placement
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
from realcustom.denoise import LoopSettings, denoise
from realcustom.job_inputs import job_conditioning
from realcustom.jobs import GenerationJob, SubjectInput

RED = Image.new("RGB", (64, 64), (200, 20, 20))
GREEN = Image.new("RGB", (64, 64), (20, 200, 20))
# One family: the running batch moves between these as rows join and leave.
FAMILY = [Bucket(rows, 64, 64, 2) for rows in (1, 2, 4)]


def request(pipeline, key, prompt, subjects, seed, steps, reuse, images=1, scale=3.5):
    job = GenerationJob(
        id=key,
        prompt=prompt,
        subjects=tuple(SubjectInput(i, t) for i, t in subjects),
        width=64,
        height=64,
        num_inference_steps=steps,
        mask_reused_step=reuse,
        seed=seed,
        num_images=images,
        guidance_scale=scale,
    )
    cond = job_conditioning(pipeline, [job])
    latents = pipeline.prepare_latents([seed], [images], 64, 64)
    return RowRequest(key, cond, latents, steps, reuse)


def alone(pipeline, row: RowRequest):
    settings = LoopSettings(row.num_steps, "dpm", ("max_norm",), row.mask_reused_step)
    return denoise(pipeline.unet, row.cond, row.latents, settings)


@pytest.fixture(params=[True, False], ids=["partial-guidance", "full-guidance"])
def batch(tiny_pipeline, request):
    graphs = GraphLoop(tiny_pipeline, EagerCapture(), partial_guidance=request.param)
    graphs.prepare(FAMILY, [GraphSettings()])
    return RunningBatch(graphs, FAMILY, GraphSettings())


def run_until_done(batch, finished, limit=50):
    for _ in range(limit):
        if not batch.slots:
            return
        finished.update({done.key: done for done in batch.step()})
    raise AssertionError("the batch did not drain")


def close(result, eager, atol=1e-5):
    scale = float(eager.latents.abs().max())
    torch.testing.assert_close(result.latents, eager.latents, rtol=0, atol=atol * scale)
    torch.testing.assert_close(result.masks, eager.masks[-1], rtol=0, atol=atol)


def test_step_batching_joined_mid_flight_equals_alone(tiny_pipeline, batch):
    """A (6 steps) runs; B (4 steps, other mask-reuse step, guidance, subjects, 2 images) joins after
    two steps; C (3 steps) joins when A still runs. Each equals its own loop run alone."""
    a = request(tiny_pipeline, "a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=6, reuse=3)
    b = request(
        tiny_pipeline,
        "b",
        "a dog and a cat",
        [(RED, "dog"), (GREEN, "cat")],
        seed=2,
        steps=4,
        reuse=1,
        images=2,
        scale=5.0,
    )
    c = request(tiny_pipeline, "c", "a cat outside", [(GREEN, "cat")], seed=3, steps=3, reuse=9)
    assert batch.join(a) and batch.bucket.batch == 1  # a lone request steps one row
    finished = {}
    for _ in range(2):
        finished.update({done.key: done for done in batch.step()})
    assert batch.join(b) and batch.free_rows == 1 and batch.bucket.batch == 4
    finished.update({done.key: done for done in batch.step()})
    assert batch.join(c) and batch.free_rows == 0
    assert not batch.join(request(tiny_pipeline, "d", "a dog", [(RED, "dog")], seed=4, steps=2, reuse=1))
    run_until_done(batch, finished)
    assert set(finished) == {"a", "b", "c"} and batch.free_rows == 4 and batch.bucket.batch == 1
    for row in (a, b, c):
        close(finished[row.key], alone(tiny_pipeline, row))


def test_step_batching_same_seed_same_image_whatever_step_it_joins_at(tiny_pipeline, batch):
    runner = request(tiny_pipeline, "long", "a dog on a sofa", [(RED, "dog")], seed=1, steps=8, reuse=4)
    late = request(tiny_pipeline, "late", "a cat outside", [(GREEN, "cat")], seed=7, steps=3, reuse=2)
    results = []
    for join_at in (0, 1, 4):
        batch.join(runner)
        finished = {}
        for _ in range(join_at):
            finished.update({done.key: done for done in batch.step()})
        batch.join(late)
        run_until_done(batch, finished)
        results.append(finished["late"])
    first = results[0]
    scale = float(first.latents.abs().max())
    for other in results[1:]:
        torch.testing.assert_close(other.latents, first.latents, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(other.masks, first.masks, rtol=0, atol=1e-5)


def test_step_batching_cancel_frees_the_rows_at_the_next_boundary(tiny_pipeline, batch):
    a = request(tiny_pipeline, "a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=4, reuse=2)
    b = request(tiny_pipeline, "b", "a cat outside", [(GREEN, "cat")], seed=3, steps=4, reuse=2, images=3)
    assert batch.join(a) and batch.join(b) and batch.free_rows == 0
    finished = {done.key: done for done in batch.step()}
    assert batch.cancel("b") and not batch.cancel("b")
    assert batch.free_rows == 3 and batch.active == ["a"] and batch.bucket.batch == 1
    run_until_done(batch, finished)
    assert set(finished) == {"a"}
    close(finished["a"], alone(tiny_pipeline, a))
    assert torch.isfinite(batch.state.latents).all()  # parked rows stay finite


def test_step_batching_rejects_what_the_bucket_cannot_hold(tiny_pipeline, batch):
    three = request(
        tiny_pipeline,
        "x",
        "a dog, a cat and a dog",
        [(RED, "dog"), (GREEN, "cat"), (RED, "dog")],
        seed=1,
        steps=2,
        reuse=1,
    )
    with pytest.raises(ValueError, match="subjects"):
        batch.join(three)
    with pytest.raises(ValueError, match="not prepared"):
        RunningBatch(batch.graphs, [Bucket(2, 64, 64)], GraphSettings())


def test_step_batching_compacts_rows_when_a_middle_request_leaves(tiny_pipeline, batch):
    """a, b, c fill rows 0, 1, 2; b (middle) finishes first: c moves down and then, after a
    finishes, to row 0 of the one-row bucket, mid-loop, and still equals its loop run alone."""
    a = request(tiny_pipeline, "a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=4, reuse=2)
    b = request(tiny_pipeline, "b", "a cat outside", [(GREEN, "cat")], seed=2, steps=2, reuse=1)
    c = request(
        tiny_pipeline, "c", "a dog and a cat", [(RED, "dog"), (GREEN, "cat")], seed=3, steps=7, reuse=5
    )
    assert batch.join(a) and batch.join(b) and batch.join(c) and batch.bucket.batch == 4
    finished = {}
    for _ in range(2):
        finished.update({done.key: done for done in batch.step()})
    # c, still updating its masks, comes first; a (past its mask-reuse step) after it.
    assert set(finished) == {"b"} and batch.bucket.batch == 2 and batch.active == ["c", "a"]
    run_until_done(batch, finished)
    for row in (a, b, c):
        close(finished[row.key], alone(tiny_pipeline, row))


def test_step_batching_guidance_covers_only_rows_still_updating_their_masks(tiny_pipeline):
    """Rows in their mask-update phase are kept first; the guidance pass runs on the smallest
    captured prefix that holds them (here 1 of 4 rows), and results still equal the loops alone."""
    graphs = GraphLoop(tiny_pipeline, EagerCapture(), partial_guidance=True)
    graphs.prepare(FAMILY, [GraphSettings()])
    batch = RunningBatch(graphs, FAMILY, GraphSettings())
    calls = []
    for key, step in list(batch.steps.items()):
        batch.steps[key] = lambda key=key, step=step: (calls.append(key[1:3]), step())
    a = request(tiny_pipeline, "a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=6, reuse=1)
    b = request(tiny_pipeline, "b", "a cat outside", [(GREEN, "cat")], seed=2, steps=6, reuse=1, images=2)
    assert batch.join(a) and batch.join(b)
    batch.step()  # step 0 updates every mask
    late = request(tiny_pipeline, "late", "a dog and a cat", [(RED, "dog"), (GREEN, "cat")], 3, 4, 3)
    assert batch.join(late) and batch.active == ["late", "a", "b"]  # updating rows first
    finished = {}
    run_until_done(batch, finished)
    kinds = [(kind.value, rows) for kind, rows in calls]
    assert kinds[:4] == [("mask_update", 4), ("mask_update", 1), ("mask_update", 1), ("mask_update", 1)]
    assert kinds[4:] == [("mask_reuse", 4)] * 2
    for row in (a, b, late):
        close(finished[row.key], alone(tiny_pipeline, row))


def parked(batch) -> tuple[torch.Tensor, torch.Tensor]:
    state = batch.state
    return state.latents[batch.used :], state.step[batch.used :]


def test_step_batching_parks_rows_past_used_at_step_0_with_zero_latents(tiny_pipeline, batch):
    """After every join, leave and move, rows past `used` of the state that steps hold zero
    latents at step 0 (their discarded computation stays finite and cheap)."""
    a = request(tiny_pipeline, "a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=3, reuse=2)
    b = request(tiny_pipeline, "b", "a cat outside", [(GREEN, "cat")], seed=2, steps=5, reuse=2, images=2)
    assert batch.join(a) and batch.join(b) and (batch.used, batch.bucket.batch) == (3, 4)
    for _ in range(4):
        batch.step()
        latents, step = parked(batch)
        assert latents.numel() == 0 or (latents.abs().max() == 0 and step.abs().max() == 0)
    assert batch.active == ["b"] and (batch.used, batch.bucket.batch) == (2, 2)
    batch.cancel("b")
    latents, step = parked(batch)
    assert batch.used == 0 and latents.abs().max() == 0 and step.abs().max() == 0


def test_step_batching_snapshot_holds_only_the_requests_own_subjects(tiny_pipeline, batch):
    one = request(tiny_pipeline, "one", "a dog on a sofa", [(RED, "dog")], seed=1, steps=3, reuse=2, images=2)
    assert batch.join(one) and batch.subjects == 2
    batch.step()
    x0, masks = batch.snapshot("one")
    assert x0.shape[0] == 2 and masks.shape[:2] == (2, 1)
    (done,) = [d for _ in range(2) for d in batch.step()]
    assert done.masks.shape[:2] == (2, 1)


def test_step_batching_refuses_a_plan_it_cannot_carry_out(tiny_pipeline, batch):
    a = request(tiny_pipeline, "a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=4, reuse=3)
    assert batch.join(a)
    with pytest.raises(ValueError, match="guidance prefix"):
        batch.apply(FamilyLayout(1, (Placement("a", 0, 1, True),), None))
    with pytest.raises(ValueError, match="neither running nor joining"):
        batch.apply(FamilyLayout(2, (Placement("a", 0, 1, True), Placement("x", 1, 1, True)), 2))
    with pytest.raises(ValueError, match="not one of this family"):
        batch.apply(FamilyLayout(3, (Placement("a", 0, 1, True),), 1))
    assert batch.active == ["a"] and batch.progress("a") == (0, 4)  # nothing changed
