"""Device measurement, cgroup limits, budget choice and its closed loop, device profiles."""

from pathlib import Path

import pytest
import torch

from cahfp.config import ConfigError, load_config
from cahfp.device.budget import BudgetModel, Calibration, Constraints
from cahfp.device.measure import measure_device, read_cgroup_limits
from cahfp.device.profiles import load_profile, profile_names
from cahfp.errors import BudgetInfeasible
from tests.conftest import REPO

MIB = 1 << 20


def calibration(sps=2e-3, small=0.8e-3):
    return Calibration(
        seconds_per_sample=sps,
        seconds_per_sample_small=small,
        small_keep=0.25,
        activation_bytes_per_sample=400_000,
        param_bytes=10 * MIB,
        state_bytes=10 * MIB,
    )


def test_linear_speed_model_goes_through_both_measurements():
    cal = calibration()
    t0, t1 = cal.per_sample(1.0)
    assert t0 + t1 == pytest.approx(2e-3)
    assert t0 + t1 * 0.25 == pytest.approx(0.8e-3)


def test_choice_respects_time_and_memory_on_known_speeds():
    model = BudgetModel(calibration(), unmeasured_margin=1.0)  # as once a round was measured
    # 10000 samples: dense 20 s; deadline 25 s * 0.8 = 20 s -> dense just fits
    fits = model.choose(
        Constraints(deadline_s=25.0, samples=10_000, batch_size=32, memory_bytes=1 << 40)
    )
    assert fits.keep == 1.0 and fits.seconds <= 20.0
    tight = model.choose(
        Constraints(deadline_s=15.0, samples=10_000, batch_size=32, memory_bytes=1 << 40)
    )
    assert tight.keep < 1.0 and tight.seconds <= 12.0
    assert "compute" in tight.reason and "deadline" in tight.reason and "MiB" in tight.reason
    # memory: 5 * 10 MiB * k + 32 * 0.4 MB * sqrt(k) must fit 0.8 * 40 MiB
    mem = model.choose(
        Constraints(deadline_s=1e6, samples=10, batch_size=32, memory_bytes=40 * MIB)
    )
    assert mem.keep < 1.0 and mem.memory <= 0.8 * 40 * MIB
    assert model.memory(mem.keep + 0.05, 32) > 0.8 * 40 * MIB


def test_choice_is_monotone_in_time_and_memory():
    model = BudgetModel(calibration())
    keeps = []
    for deadline in (3, 5, 8, 12, 16, 20, 30):
        c = Constraints(deadline_s=deadline, samples=10_000, batch_size=32, memory_bytes=1 << 40)
        try:
            keeps.append(model.choose(c).keep)
        except BudgetInfeasible:
            keeps.append(0.0)
    assert keeps == sorted(keeps) and keeps[0] < keeps[-1]
    keeps = [
        model.choose(
            Constraints(deadline_s=1e6, samples=10, batch_size=32, memory_bytes=m * MIB)
        ).keep
        for m in (15, 20, 30, 60, 200)
    ]
    assert keeps == sorted(keeps) and keeps[0] < keeps[-1]


def test_infeasible_budget_explains_itself():
    model = BudgetModel(calibration())
    with pytest.raises(BudgetInfeasible, match=r"even keep 0\.20.*sitting this round out"):
        model.choose(
            Constraints(
                deadline_s=1.0, samples=10_000, batch_size=32, memory_bytes=1 << 40, min_keep=0.2
            )
        )


def test_closed_loop_converges_for_a_slowed_client():
    model = BudgetModel(calibration())
    cons = Constraints(deadline_s=30.0, samples=10_000, batch_size=32, memory_bytes=1 << 40)
    assert model.choose(cons).keep == 1.0
    slowdown = 3.0  # the board throttles: every step now takes three times as long
    keeps = []
    for _ in range(6):
        choice = model.choose(cons)
        keeps.append(choice.keep)
        t0, t1 = model.calibration.per_sample(choice.keep)
        measured = slowdown * cons.samples * (t0 + t1 * choice.keep)
        model.observe(choice.keep, cons.samples, measured)
    assert model.correction == pytest.approx(slowdown, rel=0.05)
    assert keeps[0] == 1.0 and keeps[-1] < 0.5
    # once converged, the prediction matches what the slowed board measures
    final = model.choose(cons)
    t0, t1 = model.calibration.per_sample(final.keep)
    assert final.compute_seconds == pytest.approx(
        slowdown * 10_000 * (t0 + t1 * final.keep), rel=0.05
    )
    assert final.seconds <= 0.8 * 30.0


def test_first_round_is_planned_with_a_wider_margin_and_scoring_cost_is_learned():
    model = BudgetModel(calibration())
    cons = Constraints(
        deadline_s=20.0, samples=5_000, batch_size=32, memory_bytes=1 << 40, score_samples=256
    )
    first = model.choose(cons)
    assert first.seconds <= 0.8 * 0.85 * 20.0
    # the first round ran exactly as predicted, but scoring took 5x a dense training sample
    model.observe(
        first.keep,
        cons.samples,
        model.train_seconds(first.keep, cons.samples),
        0.0,
        scored=(256, 5 * model.train_seconds(1.0, 256)),
    )
    assert model.score_factor == pytest.approx((2.0 + 5.0) / 2)
    second = model.choose(cons)
    assert first.seconds < second.seconds <= 0.8 * 20.0
    assert second.seconds == pytest.approx(
        model.train_seconds(second.keep, cons.samples) + 3.5 * model.train_seconds(1.0, 256)
    )


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limits_from_fake_files(tmp_path):
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "slice" / "cpu.max", "50000 100000\n")  # half a core
    write(root / "slice" / "memory.max", "max\n")
    write(root / "slice" / "client" / "cpu.max", "max 100000\n")
    write(root / "slice" / "client" / "memory.max", str(512 * MIB))
    limits = read_cgroup_limits(root, "0::/slice/client\n")
    assert limits.version == 2
    assert limits.cpu_quota == pytest.approx(0.5)  # the parent's limit applies
    assert limits.memory_limit == 512 * MIB


def test_cgroup_v1_limits_from_fake_files(tmp_path):
    root = tmp_path / "cg"
    write(root / "cpu" / "tb" / "cpu.cfs_quota_us", "150000")
    write(root / "cpu" / "tb" / "cpu.cfs_period_us", "100000")
    write(root / "memory" / "tb" / "memory.limit_in_bytes", str(256 * MIB))
    limits = read_cgroup_limits(root, "4:memory:/tb\n2:cpu,cpuacct:/tb\n")
    assert limits.version == 1
    assert limits.cpu_quota == pytest.approx(1.5)
    assert limits.memory_limit == 256 * MIB
    write(root / "cpu" / "free" / "cpu.cfs_quota_us", "-1")
    write(root / "cpu" / "free" / "cpu.cfs_period_us", "100000")
    write(root / "memory" / "free" / "memory.limit_in_bytes", str(1 << 63))
    unlimited = read_cgroup_limits(root, "4:memory:/free\n2:cpu,cpuacct:/free\n")
    assert unlimited.cpu_quota is None and unlimited.memory_limit is None


def test_measure_device_reports_this_machine():
    info = measure_device()
    assert info.logical_cores >= 1 and info.memory_total > info.memory_available > 0
    assert 0 < info.usable_cores <= info.logical_cores
    assert 0 < info.usable_memory <= info.memory_available


def test_every_profile_parses_and_names_its_sources():
    names = profile_names()
    for expected in (
        "raspberry-pi-4",
        "raspberry-pi-5",
        "jetson-nano",
        "jetson-orin-nano",
        "x86-server",
    ):
        assert expected in names
    for name in names:
        p = load_profile(name)
        assert p.relative_speed > 0 and p.memory_bytes > 0
        assert set(p.sources) >= {"cores", "memory_mb", "relative_speed", "uplink_mbps"}
    assert (
        load_profile("raspberry-pi-5").relative_speed
        > load_profile("raspberry-pi-4").relative_speed
    )
    for board in ("jetson-nano", "jetson-orin-nano"):  # the GPU profile and the CPU one
        gpu, cpu = load_profile(board), load_profile(f"{board}-cpu")
        assert gpu.accelerator.startswith("cuda:") and cpu.accelerator == "none"
        assert gpu.relative_speed > 5 * cpu.relative_speed
        assert gpu.memory_bytes == cpu.memory_bytes  # unified memory, counted once


def test_the_named_boards_are_shipped_profiles_and_the_data_package_has_no_code():
    """The one list of board names (``cahfp.device.boards``: the testbed's aliases, the default
    boards of a federation and of the demo) names shipped files; ``device_profiles`` is data."""
    from cahfp.device.boards import ALIASES, DEFAULT_BOARDS
    from cahfp.device.profiles import PROFILE_PACKAGE
    from deploy.testbed import parse_profiles

    assert set(ALIASES.values()) == set(profile_names())
    assert set(DEFAULT_BOARDS) <= set(profile_names())
    assert load_config(None).clients.profiles == list(DEFAULT_BOARDS)
    assert [p.name for p in parse_profiles("pi4:2,orin:1")] == [
        ALIASES["pi4"],
        ALIASES["pi4"],
        ALIASES["orin"],
    ]
    data = REPO / PROFILE_PACKAGE
    code = [p.name for p in data.iterdir() if p.suffix == ".py"]
    assert code == ["__init__.py"] and "import" not in (data / "__init__.py").read_text()


def test_bad_profile_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown device profiles"):
        load_config(None, {"clients.profiles": ["raspberry-pi-9"]})


def test_an_emulated_board_runs_at_its_profile_speed_whatever_the_hosts_speed(monkeypatch):
    """A shared host's speed drifts by 2x; an emulated board's predicted seconds must not: the
    host's measured throughput is divided out (device seconds = FLOPs / the board's FLOP/s)."""
    import cahfp.device.calibrate as calibrate_mod
    from cahfp.client_round import ClientState
    from cahfp.device.profiles import REFERENCE_FLOPS_PER_SECOND
    from cahfp.messages import ModelSpec
    from cahfp.training import Recipe
    from edge_client.service import budget_setup

    pi4 = load_profile("raspberry-pi-4")
    assert pi4.flops_per_second == pytest.approx(pi4.relative_speed * REFERENCE_FLOPS_PER_SECOND)
    assert pi4.time_scale() == pytest.approx(1 / pi4.relative_speed)  # nothing measured
    assert pi4.time_scale(120e9) == pytest.approx(120e9 / pi4.flops_per_second)
    flops = 3e8  # training FLOPs per sample
    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    emulated = []
    for host_seconds in (1e-3, 2e-3):  # the same host, fast and slow
        cal = Calibration(
            seconds_per_sample=host_seconds,
            seconds_per_sample_small=0.4 * host_seconds,
            small_keep=0.25,
            activation_bytes_per_sample=1000,
            param_bytes=MIB,
            flops_per_sample=flops,
        )
        monkeypatch.setattr(calibrate_mod, "calibrate", lambda *a, cal=cal, **k: cal)
        state = ClientState("c", None)
        setup, _ = budget_setup(state, "raspberry-pi-4")
        setup(spec, Recipe())
        emulated.append(state.device.model.calibration.seconds_per_sample)
        assert state.time_scale == pytest.approx(flops / host_seconds / pi4.flops_per_second)
    assert emulated == pytest.approx([flops / pi4.flops_per_second] * 2)


def test_an_emulated_board_keeps_time_on_this_processs_cpu_not_the_wall_clock():
    """Boards emulated side by side share this host's cores: an emulated board times its work
    in its own CPU seconds (calibration and rounds alike), so waiting for the others' work is
    not charged to it; a real board keeps wall-clock time."""
    import time

    from cahfp.client_round import ClientState
    from cahfp.device.budget import device_budget

    pi4 = load_profile("raspberry-pi-4")
    cal = Calibration(
        seconds_per_sample=3e-3,  # wall: slowed by the other boards
        seconds_per_sample_small=1.5e-3,
        small_keep=0.25,
        activation_bytes_per_sample=1000,
        param_bytes=MIB,
        flops_per_sample=3e8,
        cpu_seconds=(1e-3, 0.5e-3),  # this process's own work
    )
    real, emulated = device_budget(cal, 1 << 30), device_budget(cal, 1 << 30, pi4)
    assert real.clock is time.perf_counter and real.model.calibration is cal
    assert emulated.clock is time.process_time
    assert emulated.time_scale == pytest.approx(3e8 / 1e-3 / pi4.flops_per_second)
    assert emulated.model.calibration.seconds_per_sample == pytest.approx(
        3e8 / pi4.flops_per_second
    )
    assert emulated.model.calibration.seconds_per_sample_small == pytest.approx(
        0.5 * 3e8 / pi4.flops_per_second
    )
    state = ClientState("c", None, device=emulated)
    t = state.clock()
    time.sleep(0.3)  # another board's turn on the cores
    assert state.clock() - t < 0.1
    older = Calibration(**{**cal.__dict__, "cpu_seconds": ()})  # cached before CPU time
    assert device_budget(older, 1 << 30, pi4).clock is time.perf_counter


def test_an_emulated_client_trains_on_one_core_unless_told(tmp_path):
    """`cahfp client --profile NAME` (or $CAHFP_PROFILE) emulates a board: one torch thread,
    so that boards emulated side by side do not spin on each other's cores."""
    import argparse

    from edge_client import service

    seen = []

    class Stop(Exception):
        pass

    def fake_local_data(args):
        seen.append(torch.get_num_threads())
        raise Stop

    threads = torch.get_num_threads()
    try:
        for profile, asked, want in (("raspberry-pi-4", None, 1), ("raspberry-pi-4", 2, 2)):
            args = argparse.Namespace(
                id="pi-01",
                federation="f",
                cert=None,
                key=None,
                threads=asked,
                profile=profile,
                device="auto",
                quantize=None,
            )
            orig = service.local_data
            service.local_data = fake_local_data
            try:
                with pytest.raises(Stop):
                    service.run_client(args)
            finally:
                service.local_data = orig
            assert seen[-1] == want
    finally:
        torch.set_num_threads(threads)


def test_calibration_measures_the_dense_models_training_flops():
    from cahfp.client_round import architecture
    from cahfp.costs import training_flops
    from cahfp.device.calibrate import calibrate
    from cahfp.messages import ModelSpec

    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    cal = calibrate(spec, 8, seconds=0.05, use_cache=False)
    x = torch.zeros(1, 1, 28, 28)
    assert cal.flops_per_sample == pytest.approx(training_flops(architecture(spec), x))
    assert cal.flops_per_second == pytest.approx(cal.flops_per_sample / cal.seconds_per_sample)
    assert calibration().flops_per_second == 0.0  # not measured


def _profile_file(tmp_path, name="odd", **figures):
    text = REPO / "device_profiles" / "raspberry-pi-4.toml"
    text = text.read_text().replace('name = "raspberry-pi-4"', f'name = "{name}"')
    lines = text.splitlines()
    for key, value in figures.items():  # the figure, not its source (same key, later)
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
        lines[i] = f"{key} = {value}"
    text = "\n".join(lines)
    path = tmp_path / f"{name}.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("figure", ["relative_speed", "uplink_mbps", "cpu_quota"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_profiles_with_non_finite_figures_are_refused_in_one_line(tmp_path, figure, value):
    path = _profile_file(tmp_path, **{figure: value})
    with pytest.raises(Exception, match=f"{figure}: Input should be a finite number") as err:
        load_profile(path)
    assert "\n" not in str(err.value)


def test_budget_settings_travel_with_the_task_and_bound_the_choice():
    """The federation's clients.safety / min_keep / max_keep reach a real client in every task
    (and in the retained status): its choice stays within them."""
    from cahfp.client_round import ClientState, announced_keep, decide_keep
    from cahfp.device.budget import device_budget
    from cahfp.messages import BudgetSettings
    from cahfp.training import Recipe

    state = ClientState("c", torch.zeros(1000))  # only its length matters here
    state.device = device_budget(calibration(), 1 << 40)
    recipe = Recipe(epochs=1, batch_size=32)

    def keep(deadline, **budget):
        return decide_keep(state, recipe, deadline, BudgetSettings(**budget)).keep

    assert keep(100.0) == 1.0
    assert keep(100.0, max_keep=0.6) == 0.6  # the federation's cap
    tight = keep(2.0)
    assert keep(2.0, safety=0.5) < tight  # less of the deadline
    with pytest.raises(BudgetInfeasible, match=r"even keep 0\.90"):
        keep(2.0, min_keep=0.9)
    # the hello's announcement is the same decision for a refresh round (no task needed)
    scoring = decide_keep(state, recipe, 2.0, BudgetSettings(), score_samples=128).keep
    assert scoring < tight
    assert announced_keep(state, recipe, 2.0, BudgetSettings(), 128)[0] == scoring
    none, why = announced_keep(state, recipe, 2.0, BudgetSettings(min_keep=0.9), 128)
    assert none == 0.0 and "even keep 0.90" in why


class _Link:
    """Records what the agent publishes (no broker)."""

    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    def subscribe(self, topic, qos=1):
        pass

    def publish(self, topic, payload, qos=1, retain=False, **_options):
        self.published.append((topic, payload if isinstance(payload, bytes) else payload.encode()))


def test_a_board_that_no_keep_fits_says_why_in_its_own_log(tmp_path, caplog, monkeypatch):
    """Issue 20 item 19: a profile under which not even min_keep fits (1e-12 of the reference
    speed) announces keep 0 (never selected) and its own log says why, once."""
    import json
    import logging

    import cahfp.device.calibrate as calibrate_mod
    from cahfp.client_round import ClientState
    from cahfp.data.datasets import ImageData
    from cahfp.messages import BudgetSettings, ModelSpec
    from cahfp.mqtt.protocol import Status, Topics
    from cahfp.training import Recipe
    from edge_client.agent import Agent
    from edge_client.service import budget_setup

    board = _profile_file(tmp_path, "glacial", relative_speed="1e-12")
    cal = calibration()
    cal.flops_per_sample = 3e8
    monkeypatch.setattr(calibrate_mod, "calibrate", lambda *a, **k: cal)
    data = ImageData(
        torch.zeros(100, 1, 28, 28, dtype=torch.uint8),
        torch.arange(100) % 10,
        [str(i) for i in range(10)],
        (0.5,),
        (0.5,),
        "tiny",
    )
    state = ClientState("slow-01", data)
    setup, profile = budget_setup(state, str(board))
    link, topics = _Link(), Topics("fed")
    agent = Agent(link, topics, state, profile=profile, calibrate_budget=setup)
    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    status = Status(
        round=0,
        state="waiting",
        model=spec.model_dump(),
        recipe=Recipe().model_dump(),
        deadline_s=60,
        budget=BudgetSettings().model_dump(),
        score_samples=128,
    )
    with caplog.at_level(logging.INFO, logger="cahfp.client"):
        agent._handle(topics.status, status.model_dump_json().encode())
        agent._handle(topics.status, status.model_dump_json().encode())  # said once
    said = [r.getMessage() for r in caplog.records if "no keep fits" in r.getMessage()]
    assert len(said) == 1 and "even keep 0.10 does not fit" in said[0], caplog.text
    hellos = [json.loads(p) for t, p in link.published if t == topics.hello("slow-01")]
    assert hellos and hellos[-1]["keep_estimate"] == 0.0
