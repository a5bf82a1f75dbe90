"""The one training loop (pyro_vae.engine): data-parallel runs on the CPU (gloo, two
processes), mixed precision, loggers, sharding, and the JIT's constants."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO

from pyro_vae import VAE, CheckpointError, Run, Temperature, UsageError, fit, load_checkpoint
from pyro_vae.data import TensorBatches
from tests import ddp_worker
from tests.helpers import REPO, run_script


def launch_two(mode: str, out: Path, mnist: Path) -> list[dict]:
    """Run tests/ddp_worker.py in two processes as torchrun does; return what each wrote."""
    done = torchrun(mode, out, mnist)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def torchrun(mode: str, out: Path, mnist: Path) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py in two processes started by torchrun."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(REPO / "tests" / "ddp_worker.py"),
        mode,
        str(out),
        str(mnist),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_train_identical_weights_and_resume_from_one_checkpoint(mnist_dir, tmp_path):
    first, second = launch_two("fit", tmp_path, mnist_dir)
    assert (first["rank"], second["rank"]) == (0, 1)
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
    assert not torch.equal(
        first["weights"]["encoder.net.1.weight"],
        ddp_worker.small_vae().state_dict()["encoder.net.1.weight"],
    )
    history = first["history"]
    # 1000 images in 2 shards of 500, batches of 100: 5 steps an epoch; resumed to 3 epochs
    assert [row["step"] for row in history] == [5, 10, 15]
    assert history[-1]["test_elbo"] > history[0]["test_elbo"]
    # the processes agree on the reduced figures (their clocks differ)
    for mine, theirs in zip(history, second["history"], strict=True):
        assert mine["test_elbo"] == theirs["test_elbo"]
        assert mine["train_loss"] == theirs["train_loss"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint.pt", "rank0.pt", "rank1.pt"]
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["world_size"] == 2 and len(saved["rng"]["torch"]) == 2
    assert not torch.equal(*saved["rng"]["torch"])  # each process draws its own noise


def test_two_processes_train_the_token_prior_as_one_process_does_with_their_whole_batch(
    mnist_dir, tmp_path
):
    """Each process takes every other sequence of the epoch's order, DDP averages the two
    halves' gradients, and each half's loss is scaled to the data set: the steps are the
    single process's steps on the whole batch, so the weights agree with its weights."""
    from pyro_vae.prior import TokenDraws, fit_prior

    first, second = launch_two("prior", tmp_path, mnist_dir)
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
    alone = ddp_worker.small_prior()
    draws, captions = ddp_worker.prior_data()
    history = fit_prior(
        alone, TokenDraws(draws), captions, test=(draws[0, :40], captions[:40]),
        batch_size=ddp_worker.PRIOR_BATCH,
        run=Run(accelerator="cpu", epochs=3, lr=1e-2, progress=False),
    )  # fmt: skip
    initial = ddp_worker.small_prior().state_dict()
    for name, weight in alone.state_dict().items():
        assert not torch.equal(weight, initial[name]), f"{name} did not move"
        theirs = first["weights"][name]
        if name.endswith("qkv.bias"):
            # the keys' bias adds one constant to a query's scores, which the softmax
            # ignores: its gradient is rounding noise, which Adam scales to full steps
            keep = torch.ones_like(weight, dtype=torch.bool)
            keep[16:32] = False  # [queries, keys, values] of width n_embd = 16
            weight, theirs = weight[keep], theirs[keep]
        assert torch.allclose(theirs, weight, atol=1e-6, rtol=1e-5), name
    assert [r["test_nats"] for r in first["history"]] == pytest.approx(
        history.column("test_nats"), rel=1e-4
    )


@pytest.mark.parametrize("mode", ["gradient", "gradient-dreg"])
def test_the_average_of_two_processes_gradients_is_the_whole_batch_gradient(
    mode, mnist_dir, tmp_path
):
    """DDP averages; the plate scales each half to the data set (the importance-weighted
    bound per image, outside its log-sum-exp); so the result is the gradient of the whole
    batch's estimate, with the same noise."""
    distributed = launch_two(mode, tmp_path, mnist_dir)
    for name in distributed[0]:
        assert torch.equal(distributed[0][name], distributed[1][name])
    x = ddp_worker.gradient_batch(mnist_dir)
    vae = ddp_worker.small_vae()
    halves = []
    for rank in range(2):
        vae.zero_grad()
        pyro.set_rng_seed(ddp_worker.GRADIENT_SEED + rank)
        part = x[rank * ddp_worker.HALF : (rank + 1) * ddp_worker.HALF]
        elbo = ddp_worker.gradient_elbo(mode)
        elbo = Trace_ELBO() if elbo == "trace" else elbo
        elbo.differentiable_loss(
            vae.model, vae.guide, part, num_data=ddp_worker.NUM_DATA
        ).backward()
        halves.append({n: p.grad.clone() for n, p in vae.named_parameters()})
    for name, grad in distributed[0].items():
        whole = (halves[0][name] + halves[1][name]) / 2
        if mode == "gradient":
            torch.testing.assert_close(grad, whole, rtol=1e-4, atol=1e-4)
        else:  # the weights' softmax summed in another order: float32 noise, ~3e-6 of the size
            scale = whole.abs().max()
            torch.testing.assert_close(grad / scale, whole / scale, rtol=0, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in distributed[0].values())


def test_a_divergence_in_one_process_stops_both_with_the_same_message(mnist_dir, tmp_path):
    first, second = launch_two("diverge", tmp_path, mnist_dir)
    assert first["error"] is not None and first["error"] == second["error"]
    assert first["step"] == second["step"] == 3
    assert "nan at step 3" in first["error"]
    # no epoch finished, so no checkpoint was written, and none half-written either
    assert not (tmp_path / "checkpoint.pt").exists()


def test_bad_streamed_data_in_one_process_stops_both_with_a_data_error(mnist_dir, tmp_path):
    """A streamed batch that fails its check in one process must not leave the other
    waiting in the next gradient exchange: both stop with a DataError, the bad process
    with the check's message, and nothing is saved."""
    first, second = launch_two("bad-data", tmp_path, mnist_dir)
    assert "NaN" in second["error"]
    assert "another process" in first["error"]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_killed_process_stops_the_other_with_one_line_naming_the_checkpoint(mnist_dir, tmp_path):
    """kill -9 of one process: the other gets gloo's "Connection reset by peer" in its
    next collective and must say, in one line, that a process was lost and where the
    last checkpoint is, instead of gloo's traceback."""
    torchrun("lost", tmp_path, mnist_dir)  # torchrun itself fails: a process was killed
    error = torch.load(tmp_path / "rank0.pt", weights_only=False)["error"]
    assert error is not None and "\n" not in error
    assert "lost contact with another process" in error
    assert f"the last checkpoint is {tmp_path / 'c.pt'}" in error and "--resume" in error
    assert load_checkpoint(tmp_path / "c.pt")["progress"]["epoch"] == 1


def test_two_processes_train_the_semi_supervised_model(mnist_dir, tmp_path):
    first, second = launch_two("ssvae", tmp_path, mnist_dir)
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
    assert first["accuracy"] == second["accuracy"] > 0.3


def test_the_fit_script_runs_two_processes(mnist_dir, tmp_path):
    """The README's multi-process command: Lightning starts the second process itself."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "scripts" / "fit.py"),
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--strategy",
        "ddp",
        "--epochs",
        "1",
        "--limit",
        "4000",
        "--test-limit",
        "500",
        "--latent-dim",
        "4",
        "--hidden",
        "32",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("config.json", "history.csv", "metrics.json", "checkpoint.pt", "samples.png"):
        assert (out / name).is_file(), name
    assert (out / "logs" / "csv").is_dir()
    # 4000 images, 2 shards of 2000, batches of 256: 8 steps
    assert load_checkpoint(out / "checkpoint.pt")["progress"]["step"] == 8


# ---------------------------------------------------------------- in one process
def test_shards_are_disjoint_cover_the_data_and_take_equal_steps():
    images = torch.arange(10).reshape(10, 1, 1, 1).to(torch.uint8)
    seen = []
    for rank in range(3):
        source = TensorBatches(images, 2, seed=1)
        batches = source.prepare(rank, 3, "cpu")
        assert len(source) == 5  # preparing a shard leaves the source as it was
        assert len(batches) == 2  # ceil(ceil(10 / 3) / 2) for every process
        seen.append(torch.cat(list(batches.epoch(0))).flatten().tolist())
    flat = [i for shard in seen for i in shard]
    assert sorted(set(flat)) == list(range(10))
    assert len(flat) == 12  # 2 wrapped around to pad the last shard
    whole = TensorBatches(images, 2, seed=1)
    assert torch.cat(list(whole.epoch(0))).flatten().tolist() != list(range(10))  # shuffled


def test_bf16_mixed_precision_stays_finite_and_close_to_float32(mnist_train, mnist_test):
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        pyro.set_rng_seed(0)
        vae = VAE(latent_dim=8, hidden=64)
        history = fit(
            vae,
            mnist_train.images[:3000],
            mnist_test.images[:500],
            batch_size=100,
            run=Run(epochs=2, precision=precision, accelerator="cpu", progress=False),
        )
        results[precision] = history.epochs[-1]
        assert all(torch.isfinite(p).all() for p in vae.parameters())
    full, half = results["32-true"], results["bf16-mixed"]
    # the networks in bfloat16 (8 bits of mantissa), the densities in float32: within 2%
    assert abs(half.test_elbo - full.test_elbo) < 0.02 * abs(full.test_elbo)
    assert abs(half.train_loss - full.train_loss) < 0.02 * full.train_loss


def test_tensorboard_receives_every_scalar_and_the_images(mnist_train, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vae = VAE(latent="relaxed-categorical", groups=4, classes=4, hidden=32)
    fit(
        vae,
        mnist_train.images[:600],
        mnist_train.images[:100],
        batch_size=100,
        warmup=1,
        elbo="meanfield",
        run=Run(
            epochs=2,
            loggers=["csv", "tensorboard"],
            log_dir=tmp_path,
            accelerator="cpu",
            progress=False,
        ),
    )
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]), size_guidance={"images": 0})
    accumulator.Reload()
    for name in ("train_loss", "test_elbo", "kl_weight", "temperature", "lr", "seconds"):
        assert [e.step for e in accumulator.Scalars(name)] == [1, 2], name
    assert [e.value for e in accumulator.Scalars("kl_weight")] == [1.0, 1.0]
    assert accumulator.Scalars("kl_weight")[0].value == 1.0  # warm-up of 1 epoch done
    assert set(accumulator.Tags()["images"]) == {"samples", "reconstructions"}
    assert list((tmp_path / "csv").rglob("metrics.csv"))


def test_an_unknown_logger_or_missing_log_dir_is_named():
    vae = VAE(latent_dim=4, hidden=16)
    x = torch.zeros(8, 1, 28, 28)
    with pytest.raises(UsageError, match="log_dir"):
        fit(vae, x, run=Run(epochs=1, loggers=["csv"], progress=False))
    with pytest.raises(UsageError, match="unknown logger"):
        fit(vae, x, run=Run(epochs=1, loggers=["wandb"], log_dir="x", progress=False))
    with pytest.raises(UsageError, match="precision"):
        fit(vae, x, run=Run(epochs=1, precision="8-bit", progress=False))


def test_jit_bakes_temperature_and_kl_weight_so_fit_refuses_their_schedules():
    """JitTrace_ELBO compiles Python numbers as constants: the temperature and KL weight
    of its first call stay for good, which a schedule would silently defeat."""
    vae = VAE(latent_dim=4, hidden=16)
    x = (torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    relaxed = VAE(latent="relaxed-categorical", groups=2, classes=3, hidden=16)
    # bound once, as a training loop does: JitTrace_ELBO compiles once per program
    model, guide = relaxed.model, relaxed.guide
    values = {}
    for name, elbo in (("eager", Trace_ELBO()), ("jit", JitTrace_ELBO())):
        for temperature in (1.0, 1.0, 0.3, 3.0):
            relaxed.latent.temperature = temperature
            pyro.set_rng_seed(0)
            values[name, temperature] = elbo.differentiable_loss(model, guide, x).item()
    assert len({values["eager", t] for t in (1.0, 0.3, 3.0)}) == 3
    # the temperature of the first call is in the graph for good
    assert values["jit", 1.0] == values["jit", 0.3] == values["jit", 3.0]
    # and so is the KL weight (a warm-up's schedule)
    jit, model, guide, weighted = JitTrace_ELBO(), vae.model, vae.guide, []
    for weight in (0.5, 0.5, 0.1):
        pyro.set_rng_seed(0)
        with vae.kl_weight(weight):
            weighted.append(jit.differentiable_loss(model, guide, x).item())
    assert weighted[1] == weighted[2]  # compiled at 0.5, the 0.1 never reached the graph
    pyro.set_rng_seed(0)
    with vae.kl_weight(0.1):
        eager = Trace_ELBO().differentiable_loss(model, guide, x).item()
    assert eager != weighted[2]
    with pytest.raises(UsageError, match="warm-up"):
        fit(vae, x, elbo="jit", warmup=1, run=Run(epochs=1, progress=False))
    relaxed.latent.temperature = 1.0
    with pytest.raises(UsageError, match="temperature"):
        fit(relaxed, x, elbo="jit", run=Run(epochs=1, progress=False))
    history = fit(
        relaxed,
        x,
        elbo="jit",
        temperature=Temperature(schedule="constant"),
        run=Run(epochs=1, progress=False),
    )
    assert len(history.epochs) == 1


def test_ddp_spawn_trains_two_processes_and_loads_the_weights_back(mnist_train):
    """ddp_spawn starts the processes from inside fit (notebooks): the run reaches them
    and the trained weights come back into the caller's VAE."""
    pyro.set_rng_seed(0)
    vae = VAE(latent_dim=4, hidden=16)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    run = Run(epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", progress=False)
    history = fit(vae, mnist_train.images[:400], mnist_train.images[:100], batch_size=50, run=run)
    assert [record.step for record in history.epochs] == [4]  # 200 images per process
    assert history.epochs[0].test_elbo < 0
    assert any(not torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_a_resume_with_another_number_of_processes_is_refused(mnist_train, tmp_path):
    vae = VAE(latent_dim=4, hidden=16)
    checkpoint = tmp_path / "c.pt"
    fit(vae, mnist_train.images[:200], run=Run(epochs=1, checkpoint=checkpoint, progress=False))
    state = torch.load(checkpoint, weights_only=True)
    state["world_size"] = 2
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointError, match="2 process"):
        fit(
            vae,
            mnist_train.images[:200],
            run=Run(epochs=2, checkpoint=checkpoint, resume=True, progress=False),
        )


def test_fit_ssvae_script_resumes(mnist_dir, tmp_path):
    out = tmp_path / "m2"
    common = [
        "--data-dir",
        mnist_dir,
        "--limit",
        600,
        "--test-limit",
        100,
        "--latent-dim",
        4,
        "--hidden",
        32,
        "--labels-per-class",
        2,
        "--out",
        out,
        "--no-progress",
    ]
    assert run_script("fit_ssvae.py", *common, "--epochs", 1) == 0
    assert run_script("fit_ssvae.py", *common, "--epochs", 2, "--resume") == 0
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].split(",")[:3] == ["epoch", "step", "train_loss"]
    assert "test_accuracy" in rows[0].split(",")


def test_ssvae_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(mnist_train, tmp_path):
    from pyro_vae.ssvae import SSVAE, balanced_labels, fit_ssvae

    pool = mnist_train.head(300)
    labelled = balanced_labels(pool.labels, 2)
    data = (pool.images[labelled], pool.labels[labelled], pool.images)
    options = {"batch_size": 50, "aux_weight": 1.0}
    run = Run(epochs=2, accelerator="cpu", progress=False)

    pyro.set_rng_seed(0)
    reference = SSVAE(latent_dim=4, hidden=32)
    fit_ssvae(reference, *data, **options, run=run)

    pyro.set_rng_seed(0)
    ssvae = SSVAE(latent_dim=4, hidden=32)
    calls = {"n": 0}

    def press_ctrl_c(module, inputs):
        calls["n"] += 1
        if calls["n"] == 17:  # in the 3rd step of epoch 2 (6 steps an epoch, 2 calls a step)
            os.kill(os.getpid(), signal.SIGINT)

    hook = ssvae.classifier.register_forward_pre_hook(press_ctrl_c)
    path = tmp_path / "m2.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_ssvae(ssvae, *data, **options, run=run.replace(checkpoint=path))
    hook.remove()
    progress = load_checkpoint(path)["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 3, 9)

    pyro.set_rng_seed(1)  # the checkpoint's RNG state, not this, must decide what follows
    resumed = SSVAE(latent_dim=4, hidden=32)
    history = fit_ssvae(resumed, *data, **options, run=run.replace(checkpoint=path, resume=True))
    assert [record.epoch for record in history.epochs] == [1, 2]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6)


def test_fit_script_writes_tensorboard_events_in_the_run_folder(mnist_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code = run_script(
        "fit.py",
        "--data-dir",
        mnist_dir,
        "--out",
        out,
        "--epochs",
        1,
        "--limit",
        500,
        "--test-limit",
        100,
        "--latent-dim",
        4,
        "--hidden",
        32,
        "--logger",
        "tensorboard",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert code == 0
    (events,) = (out / "logs" / "tensorboard").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"train_loss", "test_elbo", "kl_weight", "lr", "seconds"} <= set(
        accumulator.Tags()["scalars"]
    )
    assert list((out / "logs" / "csv").rglob("metrics.csv"))


def test_fit_trains_identically_with_the_fused_and_pyros_elbo():
    """fit's default ("trace", fused) and Pyro's own Trace_ELBO ("trace-pyro"): the same
    run, epoch for epoch, from the same seed."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(300, 1, 28, 28, generator=generator) * 255).to(torch.uint8)
    runs = {}
    for elbo in ("trace", "trace-pyro", "meanfield", "meanfield-pyro"):
        pyro.set_rng_seed(0)
        vae = VAE(latent_dim=4, hidden=16)
        history = fit(
            vae,
            images,
            images[:100],
            batch_size=50,
            elbo=elbo,
            beta=0.5,
            warmup=1,
            run=Run(epochs=2, accelerator="cpu", progress=False),
        )
        runs[elbo] = history.column("test_elbo"), vae.state_dict()
    for fused, plain in (("trace", "trace-pyro"), ("meanfield", "meanfield-pyro")):
        assert runs[fused][0] == pytest.approx(runs[plain][0], rel=1e-5)
        for name, weight in runs[fused][1].items():
            torch.testing.assert_close(weight, runs[plain][1][name], rtol=1e-4, atol=1e-5)


def test_the_device_tally_skips_every_step_from_the_first_bad_one_and_names_it():
    """What accelerators and several processes use: no read of the loss per step; the
    first non-finite step and every later one are skipped by fused Adam on the device."""
    from pyro_vae.divergence import SyncPolicy, Tally
    from pyro_vae.errors import TrainingDivergedError

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    policy = SyncPolicy.choose(world=2, device=torch.device("cpu"), scaler=False, fused=True)
    assert policy.skip_on_device and policy.every > 1 and not policy.host
    tally = Tally(policy, torch.device("cpu"), 0.0, 0)
    losses = [10.0, 20.0, float("nan"), 30.0]
    for step, value in enumerate(losses, start=1):
        tally.add(torch.tensor(value), 5, 10, step)
        weight.grad = torch.ones(3)
        before = weight.detach().clone()
        optimizer.found_inf = tally.found_inf()
        optimizer.step()
        assert torch.equal(weight, before) == (step >= 3), step
    assert tally.totals(torch.device("cpu")).tolist() == [15.0, 20.0]  # (10 + 20) / 2, 4 x 5
    with pytest.raises(TrainingDivergedError, match="step 3"):
        tally.check(False, None)


def test_float64_training_with_held_out_data_and_the_script(mnist_train, mnist_dir, tmp_path):
    vae = VAE(latent_dim=4, hidden=16)
    history = fit(
        vae,
        mnist_train.images[:200],
        mnist_train.images[:50],
        batch_size=50,
        run=Run(epochs=1, precision="64-true", accelerator="cpu", progress=False),
    )
    assert next(vae.parameters()).dtype == torch.float64
    assert history.epochs[0].test_elbo < 0
    code = run_script(
        "fit.py",
        "--data-dir",
        mnist_dir,
        "--out",
        tmp_path / "run",
        "--epochs",
        1,
        "--limit",
        300,
        "--test-limit",
        50,
        "--latent-dim",
        4,
        "--hidden",
        16,
        "--precision",
        "64-true",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert code == 0 and (tmp_path / "run" / "reconstructions.png").is_file()


def test_a_zero_kl_weight_and_a_device_with_many_devices_are_named():
    vae = VAE(latent_dim=4, hidden=16)
    x = torch.zeros(8, 1, 28, 28)
    with pytest.raises(UsageError, match="beta=0"):
        fit(vae, x, beta=0, run=Run(epochs=1, progress=False))
    with pytest.raises(UsageError, match="names one device"):
        fit(vae, x, run=Run(epochs=1, accelerator="cpu:0", devices=2, progress=False))


def test_the_host_tally_names_the_first_bad_step_even_when_read_late():
    from pyro_vae.divergence import SyncPolicy, Tally
    from pyro_vae.errors import TrainingDivergedError

    policy = SyncPolicy.choose(world=1, device=torch.device("cpu"), scaler=False, fused=True)
    assert policy.host and policy.every == 1
    tally = Tally(policy, torch.device("cpu"), 0.0, 0)
    for step, value in enumerate([1.0, float("nan"), float("inf")], start=1):
        tally.add(torch.tensor(value), 4, 8, step)
    with pytest.raises(TrainingDivergedError, match="nan at step 2"):
        tally.check(False, None)


def test_cpu_training_does_not_ask_for_cuda_on_every_step(monkeypatch):
    """Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, and torch's Adam asks
    torch.cuda.is_available() on every step, which then loads NVML each time (about
    0.3 ms on a CUDA build of torch without a GPU). fit's optimizer does not ask on the
    CPU: the number of questions does not grow with the number of steps."""
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    asked = []
    real = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(1) or real())
    param = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.Adam([param])
    param.grad = torch.ones(3)
    plain.step()
    if not asked:
        pytest.skip("this torch's Adam no longer asks for CUDA on each step")
    images = torch.rand(64, 1, 28, 28).round()
    counts = []
    for epochs in (1, 3):
        asked.clear()
        fit(
            VAE(latent_dim=2, hidden=8),
            images,
            batch_size=16,
            run=Run(epochs=epochs, accelerator="cpu", progress=False),
        )
        counts.append(len(asked))
    assert counts[0] == counts[1], f"questions for 4 and 12 steps: {counts}"


def test_fabrics_wrappers_are_skipped_only_where_they_pass_calls_on():
    from lightning_fabric import Fabric

    from pyro_vae.devices import passthrough

    assert passthrough(Fabric(accelerator="cpu", devices=1))
    for options in (
        {"precision": "bf16-mixed"},
        {"precision": "64-true"},
        {"devices": 2, "strategy": "ddp"},
    ):
        assert not passthrough(Fabric(accelerator="cpu", **{"devices": 1, **options}))
