"""What a person sees first: no ``loss=nan`` before a loss is logged, and no ETA on a Ray run's bar until its steps
give a rate (the workers' start-up once read as slow steps: 1:06:14 for a run of minutes)."""
import io
import re
import time

from lkd_ray.train.progress import Progress, RunBar


def test_the_step_bar_shows_no_loss_until_one_is_logged():
    out = io.StringIO()
    p = Progress("teacher cnn_teacher", 2, stream=out)
    p.start(200)
    for _ in range(49):  # log_every 50: no loss synced yet
        p.step({})
    assert not p.bar.postfix and "nan" not in str(p.bar) and "nan" not in out.getvalue()
    p.step({"loss": 0.5})
    assert p.bar.postfix == "loss=0.500"
    p.close()


def _eta_s(bar: RunBar) -> float | None:
    """The remaining time the bar shows (None for tqdm's '?')."""
    m = re.search(r"<(\?|(?:(\d+):)?(\d+):(\d+))", str(bar.bar))
    assert m, str(bar.bar)
    if m.group(1) == "?":
        return None
    return int(m.group(2) or 0) * 3600 + int(m.group(3)) * 60 + int(m.group(4))


def test_a_ray_run_s_bar_shows_no_eta_until_its_steps_give_a_rate():
    bar = RunBar("run (lkd)", 1000, stream=io.StringIO())
    bar.show(0, None)  # the workers are still starting: no bar yet
    assert bar.bar is None
    time.sleep(1.0)  # the start-up, which is not a step
    bar.show(5, None)
    assert _eta_s(bar) is None and "nan" not in str(bar.bar)
    time.sleep(0.5)
    bar.show(55, 0.7)  # 50 steps in 0.5 s: about 10 s left, not the minutes start-up would make of it
    eta = _eta_s(bar)
    assert eta is not None and eta < 60, str(bar.bar)
    assert "loss=0.700" in str(bar.bar)
    bar.close()
