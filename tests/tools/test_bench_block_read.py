"""The load format's read benchmark (benchmarks/bench_block_read.py): on the
CPU it reads every expert tensor's bytes of a synthetic MoE checkpoint, equal
to the files' (``--check``), in the pieces the load format cuts; bad
arguments and checkpoints without experts get one line and exit 2."""

import json
from pathlib import Path

import pytest
import torch

from scripts import load_script, run_main, run_script
from vllm_w4a8_fastprep import expert_blocks
from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_block_read.py"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bbr-moe"), "tiny-moe",
                            shard_bytes=96 << 10)


def test_it_reads_every_expert_byte_in_the_load_formats_pieces(moe, tmp_path):
    out = tmp_path / "r.json"
    proc = run_script(SCRIPT, moe, "--threads", "1,3", "--piece-mib", "1", "--runs", "2",
                      "--check", "--json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    entries = {}
    for f in moe.glob("*.safetensors"):
        entries.update(expert_blocks.read_header(str(f)))
    experts = [e for n, e in entries.items() if ".experts." in n]
    assert res["tensors"] == len(experts) > 0
    assert res["bytes"] == sum(e.end - e.start for e in experts)
    cases = [r["case"] for r in res["rows"]]
    assert cases[0] == "headers" and "read, 1 threads, <= 1 MiB" in cases
    assert "read, 3 threads, <= 1 MiB" in cases
    if not torch.cuda.is_available():
        assert not any("send" in c for c in cases)
    bench = load_script(SCRIPT)
    cut = bench.pieces(experts, 1 << 20)
    covered = sum(size for _, _, size in cut)
    assert covered >= res["bytes"] and len({p for p, _, _ in cut}) > 1  # many files


def test_the_check_names_the_first_byte_that_differs(moe):
    bench = load_script(SCRIPT)
    entries, _ = bench.expert_entries(moe)
    path, start, size = bench.pieces(entries, 1 << 20)[0]
    got = torch.empty(size, dtype=torch.uint8)
    bench.read_all([(path, start, size)], 2, [got])
    bench._check(path, start, got)  # the same bytes
    got[size // 2] ^= 0xFF
    with pytest.raises(bench.OneLineError, match=rf"byte {start + size // 2} read differs"):
        bench._check(path, start, got)


@pytest.mark.parametrize("args, said", [
    (["{missing}"], "not a folder"),
    (["{dense}"], "no MoE expert tensors"),
    (["{empty}"], "no .safetensors files"),
    (["{dense}", "--threads", "0"], "expected whole numbers above 0"),
    (["{dense}", "--piece-mib", "8,x"], "expected whole numbers above 0"),
])
def test_bad_arguments_get_one_line(tmp_path, args, said, capsys):
    dense = write_checkpoint(tmp_path / "dense", "tiny")
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "missing", "dense": dense, "empty": tmp_path / "empty"}
    status, _, err = run_main(load_script(SCRIPT).main, [a.format(**names) for a in args],
                              capsys)
    assert status == 2, err
    assert said in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_argument_in_a_real_process_is_one_line(tmp_path):
    proc = run_script(SCRIPT, tmp_path / "missing")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a folder" in proc.stderr


def test_expert_parallel_reads_are_computed_per_rank_and_placement(moe, tmp_path, capsys):
    """--ep N: each rank's bytes read (its experts and the small gaps read
    through: other ranks' tensors, and other tensors between experts, as in
    this many-file checkpoint) over its experts' bytes. (The benchmark's main in this process;
    the tests above and below start it as a process of its own.)"""
    out = tmp_path / "ep.json"
    bench = load_script(SCRIPT)
    for ranks in (1, 2):
        status, _, err = run_main(bench.main, [moe, "--ep", ranks, "--json", out], capsys)
        assert status == 0, err[-2000:]
        res = json.loads(out.read_text())["read_over_own"]
        assert set(res) == {"linear", "round_robin"}
        assert all(len(v) == ranks for v in res.values())
        if ranks == 1:  # one rank: the placements are the same
            assert res["linear"] == res["round_robin"]
            alone = res["linear"][0]
        assert all(x >= 1.0 for v in res.values() for x in v)
    assert min(res["round_robin"]) > alone  # the other rank's experts lie between
    entries, _ = bench.expert_entries(moe)
    odd = [e for e in entries if ".experts.3." in e.name]  # one expert alone
    assert bench.pieces(odd, 1 << 20)  # read in its own pieces
    proc = run_script(SCRIPT, moe, "--ep", 3)
    assert proc.returncode == 2 and "do not divide into 3 ranks" in proc.stderr, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_read_and_send_lands_each_piece_as_read(moe):
    """The benchmark's read-ahead (the next piece read while one is sent,
    two buffers taking turns): the last piece sent from each buffer is on
    the GPU as the file holds it."""
    bench = load_script(SCRIPT)
    entries, _ = bench.expert_entries(moe)
    cut = bench.pieces(entries, 64 << 10)
    assert len(cut) >= 4
    cap = max(size for _, _, size in cut)
    hosts = [torch.empty(cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    devs = [torch.empty(cap, dtype=torch.uint8, device="cuda") for _ in range(2)]
    assert bench.read_and_send(cut, 3, hosts, devs) > 0
    for n in (len(cut) - 2, len(cut) - 1):
        path, start, size = cut[n]
        bench._check(path, start, devs[n % 2][:size].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_register_and_send_lands_each_piece_from_the_registered_files(moe):
    """Sending straight from the files' registered pages, many files and
    pieces that share pages: no registration refused (each file's mapping is
    registered once), the last piece sent from each buffer as the file holds
    it, and the GPU usable afterwards."""
    bench = load_script(SCRIPT)
    entries, _ = bench.expert_entries(moe)
    cut = bench.pieces(entries, 64 << 10)
    assert len({p for p, _, _ in cut}) > 1
    cap = max(size for _, _, size in cut)
    devs = [torch.empty(cap, dtype=torch.uint8, device="cuda") for _ in range(2)]
    assert bench.register_and_send(cut, devs) > 0
    for n in (len(cut) - 2, len(cut) - 1):
        path, start, size = cut[n]
        bench._check(path, start, devs[n % 2][:size].cpu())
    torch.empty(1, device="cuda").add_(1)
    torch.cuda.synchronize()
