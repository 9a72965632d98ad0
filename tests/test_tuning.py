"""The host TCP settings a miner wants: which this host lacks, and the line that tells its operator."""

from __future__ import annotations

from mapreduce_ray.wire.tuning import MINER_SYSCTLS, advice, untuned

KEY = "net.ipv4.tcp_slow_start_after_idle"


def host(tmp_path, value: str | None):
    """A /proc/sys with the slow-start setting at `value` (None: a kernel without it)."""
    if value is not None:
        path = tmp_path / "net" / "ipv4" / "tcp_slow_start_after_idle"
        path.parent.mkdir(parents=True)
        path.write_text(f"{value}\n")
    return tmp_path


def test_a_miner_wants_idle_connections_to_keep_their_window():
    assert MINER_SYSCTLS == {KEY: "0"}


def test_linux_default_is_reported_with_the_value_wanted(tmp_path):
    assert untuned(root=host(tmp_path, "1")) == {KEY: "0"}


def test_a_tuned_host_lacks_nothing(tmp_path):
    assert untuned(root=host(tmp_path, "0")) == {}


def test_a_setting_the_kernel_lacks_is_left_out(tmp_path):
    assert untuned(root=host(tmp_path, None)) == {}


def test_the_advice_is_one_line_naming_the_command():
    assert advice({KEY: "0"}) == (
        "this host restarts idle TCP connections from slow start, so every round's results start slowly: "
        "run `sysctl -w net.ipv4.tcp_slow_start_after_idle=0` as root (README: Running the parties)"
    )
