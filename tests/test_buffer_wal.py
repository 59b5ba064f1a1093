"""Write-ahead log: torn tails, checksums, compaction, and the inspect command."""

import msgspec

from async_rl import cli
from async_rl.messages import encode
from buffer.replay import ReplayBuffer
from buffer.wal import Dropped, Put, Served, WriteAheadLog, read_records
from tests.helpers import fill_group, make_trajectory, take


def _log_three(path):
    wal = WriteAheadLog(path, fsync="always")
    for i in range(3):
        wal.append(Put(frame=msgspec.Raw(encode(make_trajectory(f"s{i}", "g", group_size=3)))))
        wal.commit()
    wal.close()
    return path.stat().st_size


def test_a_torn_tail_is_cut_off_and_the_intact_prefix_survives(tmp_path):
    path = tmp_path / "buffer.wal"
    size = _log_three(path)
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02")  # a record header whose payload never made it
    wal = WriteAheadLog(path)
    assert len(wal.recovered) == 3 and path.stat().st_size == size
    wal.append(Served(trainer_version=1, sample_ids=["s0", "s1", "s2"], group_ids=["g"]))
    wal.close()
    assert len(read_records(path)[0]) == 4


def test_a_checksum_mismatch_ends_replay_there(tmp_path):
    path = tmp_path / "buffer.wal"
    _log_three(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the last record's payload
    path.write_bytes(bytes(data))
    records, _ = read_records(path)
    assert len(records) == 2


def test_compaction_rebuilds_the_same_state(tmp_path):
    path = tmp_path / "buffer.wal"
    wal = WriteAheadLog(path)
    live = ReplayBuffer(capacity=100)

    def log(record, header=None):
        wal.append(record)
        live.apply(record, header)

    for group, version in (("a", 0), ("b", 3), ("c", 3)):
        fill_group(live, group, version)
    for group in live.groups.values():
        for entry in group.members.values():
            wal.append(Put(frame=entry.frame))
    plan = live.plan_batch(trainer_version=4, num_groups=1, max_staleness=2, include_stale=False)
    log(plan.dropped)
    log(plan.served)
    wal.rewrite(live.live_records())
    wal.close()
    rebuilt = ReplayBuffer(capacity=100)
    for record in read_records(path)[0]:
        rebuilt.apply(record)
    assert rebuilt.stats() == live.stats()
    assert rebuilt.served_groups == live.served_groups == {"b"} and rebuilt.dropped_groups == {"a"}
    replayed = take(rebuilt, 4, 1, 2)  # the batch served for version 4 is kept, and served again
    assert replayed.replayed and replayed.frames == plan.frames
    assert take(rebuilt, 5, 1, 2).served.group_ids == ["c"]


def test_inspect_prints_counts_by_version_and_staleness(tmp_path, capsys):
    path = tmp_path / "buffer.wal"
    wal = WriteAheadLog(path)
    for i, version in enumerate((2, 2, 5)):
        wal.append(Put(frame=msgspec.Raw(encode(make_trajectory(f"s{i}", f"g{i}", version)))))
    wal.append(Dropped(sample_ids=[], group_ids=[]))
    wal.close()
    assert cli.main(["buffer", "inspect", str(tmp_path), "--trainer-version", "6"]) == 0
    out = capsys.readouterr().out
    assert "stored 3" in out
    assert "version      2  staleness    4         2" in out
    assert "version      5  staleness    1         1" in out
