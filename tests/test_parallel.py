"""parallel.py and train.py --parallel fsdp on the CPU (gloo, 2 processes, the --fast toy world's tiny models):
FSDP gives DDP's weights, resumes exactly, never hangs when the ranks' rollouts have different lengths, shards a
mixture-of-experts teacher, and writes checkpoints that plain from_pretrained loads."""

import shutil
from pathlib import Path

import pytest
import torch

from test_train import ROOT, _args, _metrics, _run, _weights  # the same helpers as the DDP tests


def _untied_copy(src: Path, dst: Path) -> Path:
    """The toy student (tied embeddings) as an untied model with the same function: lm_head a copy of the
    embedding, so both FSDP cases (tied, untied head) can be tested."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    state = {k: v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.get_input_embeddings().weight.detach().clone()
    untied.load_state_dict(state)
    untied.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return dst


_COMPILED_CONTINUATIONS = """
import sys
sys.path.insert(0, {root!r})
import sample, train
sample.COMPILED_CONTINUATIONS = {{"cpu", "cuda"}}  # the probe's and the windows' continuations compiled, as on CUDA
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("mode, tied", [("opd", False), ("topd", True)])
def test_fsdp_gives_the_weights_of_ddp(fast_world, tmp_path, mode, tied):
    """Same data, same seeds, 2 processes: FSDP2 (sharded weights, gradients and AdamW state, the fused head reading
    the root's unsharded weight) must give the weights DDP gives, to 1e-5, and a checkpoint that plain
    from_pretrained loads. topd runs the probe (lockstep chunks) and the guidance phase; the tied case is the toy's
    own student, the untied one a copy with a separate LM head."""
    from transformers import AutoModelForCausalLM

    world, _ = fast_world
    student = world / "student" if tied else _untied_copy(world / "student", tmp_path / "untied")
    common = ["--student", str(student), "--steps", "2", "--rollout-batch", "8", "--micro-batch", "2", "--mode", mode,
              "--detector", "probe", "--probe-samples", "2", "--horizon", "6", "--eval-every", "0", "--lr", "1e-3"]
    _run(_args(world, tmp_path / "ddp", *common), nproc=2)
    proc = _run(_args(world, tmp_path / "fsdp", *common, "--parallel", "fsdp"), nproc=2)
    assert "2 process(es) on cpu" in proc.stdout
    a, b = _weights(tmp_path / "ddp" / "ckpt-000002"), _weights(tmp_path / "fsdp" / "ckpt-000002")
    init = _weights(student)
    assert sorted(a) == sorted(b)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # training really moved the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max().item())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "ckpt-000002")  # the HF folder, as is
    assert loaded.config.tie_word_embeddings == tied
    for name, p in loaded.state_dict().items():
        if name in b:
            assert torch.equal(p, b[name]), name
    assert torch.equal(loaded.get_output_embeddings().weight, b.get("lm_head.weight", b["model.embed_tokens.weight"]))
    # reduce-scattering after every backward (no unsharded accumulators; opd) and, for topd, activation
    # checkpointing switched off around the guidance windows together with compiled decoding (rollouts from the
    # gathered student, continuations in lockstep chunks, all through the compiled step) change nothing either
    variant = ["--sync-every-backward"] if mode == "opd" else ["--gradient-checkpointing", "--decode", "compiled"]
    driver = tmp_path / "compiled.py"
    driver.write_text(_COMPILED_CONTINUATIONS.format(root=str(ROOT)))
    _run(_args(world, tmp_path / "fsdp-variant", *common, "--parallel", "fsdp", *variant), nproc=2, script=driver)
    c = _weights(tmp_path / "fsdp-variant" / "ckpt-000002")
    assert all(torch.allclose(a[k], c[k], atol=1e-5) for k in a), variant
    ma, mb = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "fsdp")
    for ra, rb in zip(ma, mb):
        assert ra["opd/teacher_kl"] == pytest.approx(rb["opd/teacher_kl"], rel=1e-5)
    if mode == "topd":
        assert all(r["guide/tokens"] > 0 for r in mb)  # the guidance phase really ran under FSDP
    # the optimizer state is saved sharded (one DCP shard per rank), not in trainer_state.pt
    assert (tmp_path / "fsdp" / "ckpt-000002" / "optimizer" / ".metadata").exists()


def test_fsdp_resume_reproduces_the_uninterrupted_run(fast_world, tmp_path):
    """2 steps, stop, --resume for 2 more (optimizer state reloaded from its DCP shards) == 4 steps in one go; and
    the same checkpoint resumed by ONE process (DCP reshards the optimizer state; 1 process x 2 micro-batches sees
    the data 2 processes x 1 micro-batch saw) gives the same weights too."""
    world, _ = fast_world
    common = ["--steps", "4", "--rollout-batch", "4", "--micro-batch", "2", "--mode", "opd", "--eval-every", "0",
              "--lr", "1e-3", "--parallel", "fsdp", "--no-self-check"]
    _run(_args(world, tmp_path / "whole", *common), nproc=2)
    _run(_args(world, tmp_path / "split", *common, "--stop-at-step", "2"), nproc=2)
    shutil.copytree(tmp_path / "split", tmp_path / "one-process")
    _run(_args(world, tmp_path / "split", *common, "--resume"), nproc=2)
    _run(_args(world, tmp_path / "one-process", *common, "--resume"))
    a = _weights(tmp_path / "whole" / "ckpt-000004")
    for other, atol in (("split", 1e-6), ("one-process", 1e-5)):
        b = _weights(tmp_path / other / "ckpt-000004")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=atol), (other, k, (a[k] - b[k]).abs().max().item())
    assert [r["step"] for r in _metrics(tmp_path / "split")] == [1, 2, 3, 4]


# Rank 0's rollouts all end at their first token (every token id is a stop token there, and so a special token:
# no candidates on rank 0 either), rank 1's never stop and run to the cap: the ranks' sampling loops, probes,
# guidance rounds and evaluation batches all differ in length. Without lockstep the first collective that one
# rank skips hangs the job; the timeout turns that into a failure.
_UNEVEN = """
import os, sys
sys.path.insert(0, {root!r})
import sample, train
rank = int(os.environ["RANK"])
sample.eos_token_ids = lambda model, tokenizer: list(range(len(tokenizer))) if rank == 0 else [-1]
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("mode, detector", [("opd", "probe"), ("opd_suppress", "window"), ("opd_suppress", "probe"),
                                            ("topd", "window"), ("topd", "probe")])
def test_fsdp_never_hangs_when_the_ranks_rollouts_differ_in_length(fast_world, tmp_path, mode, detector):
    world, _ = fast_world
    driver = tmp_path / "uneven.py"
    driver.write_text(_UNEVEN.format(root=str(ROOT)))
    out = tmp_path / "out"
    args = _args(world, out, "--steps", "1", "--rollout-batch", "4", "--micro-batch", "2", "--mode", mode,
                 "--detector", detector, "--probe-samples", "2", "--horizon", "4", "--max-new-tokens", "12",
                 "--eval-prompts", str(world / "test.jsonl"), "--eval-limit", "6", "--parallel", "fsdp")
    _run(args, nproc=2, timeout=300, script=driver)
    m = _metrics(out)[0]
    # half the rollouts (rank 0's) have 1 token, the other half the cap: the mean length tells both really ran
    assert m["rollout/len_mean"] == pytest.approx((1 + 12) / 2)
    if mode == "topd":
        assert m["guide/tokens"] > 0  # rank 1 had windows, rank 0 none: phase B still finished
    assert (out / "latest").read_text() == "ckpt-000001"


_TEARDOWN = """
import gc, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
import train
close = dist.destroy_process_group
def counting_close(*args, **kwargs):  # what is still sharded and alive when the process group closes
    alive = gc.get_objects()
    print(f"rank {{os.environ['RANK']}}: {{sum(isinstance(o, FSDPModule) for o in alive)}} sharded modules, "
          f"{{sum(isinstance(o, DTensor) for o in alive)}} DTensors alive at destroy_process_group", flush=True)
    return close(*args, **kwargs)
dist.destroy_process_group = counting_close
gc.disable()  # no automatic collection may hide a leak: only train.py's own collection counts
train.main(sys.argv[1:])
"""


def test_fsdp_frees_its_modules_before_closing_the_process_group(fast_world, tmp_path):
    """FSDP's modules live in reference cycles; left to the collector at interpreter exit, they were torn down after
    the process group had closed and a rank aborted now and then ("terminate called without an active exception").
    main() must free every sharded module and tensor (student, teacher, AdamW state) before destroy_process_group."""
    world, _ = fast_world
    driver = tmp_path / "teardown.py"
    driver.write_text(_TEARDOWN.format(root=str(ROOT)))
    args = _args(world, tmp_path / "out", "--steps", "1", "--rollout-batch", "4", "--micro-batch", "2", "--mode",
                 "topd", "--detector", "window", "--horizon", "4", "--max-new-tokens", "12", "--eval-every", "0",
                 "--parallel", "fsdp")
    proc = _run(args, nproc=2, timeout=300, script=driver)
    counts = sorted(line for line in proc.stdout.splitlines() if "alive at destroy_process_group" in line)
    assert counts == [f"rank {r}: 0 sharded modules, 0 DTensors alive at destroy_process_group" for r in (0, 1)], \
        proc.stdout


def _tiny_moe_teacher(world: Path, dst: Path) -> Path:
    """A Qwen3-MoE model (4 experts, 2 per token) over the toy's vocabulary and tokenizer, random weights."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(world / "teacher")
    gen = GenerationConfig.from_pretrained(world / "teacher")
    config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                            tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=gen.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(dst)
    tok.save_pretrained(dst)
    gen.save_pretrained(dst)
    return dst


def test_a_mixture_of_experts_teacher_is_sharded_and_scores_like_the_unsharded_one(fast_world, tmp_path):
    """The paper's teacher is a mixture of experts (Qwen3-30B-A3B): a tiny Qwen3-MoE teacher, sharded by FSDP in a
    topd run on 2 processes, gives the same first-step teacher KL as the same run under DDP, where it is whole."""
    world, _ = fast_world
    teacher = _tiny_moe_teacher(world, tmp_path / "moe")
    common = ["--teacher", str(teacher), "--steps", "1", "--rollout-batch", "4", "--micro-batch", "2", "--mode",
              "topd", "--detector", "window", "--horizon", "4", "--eval-every", "0"]
    _run(_args(world, tmp_path / "ddp", *common), nproc=2)
    proc = _run(_args(world, tmp_path / "fsdp", *common, "--parallel", "fsdp"), nproc=2)
    assert "teacher self-check" in proc.stdout  # the fused head of the sharded MoE matched its own logits
    a, b = _metrics(tmp_path / "ddp")[0], _metrics(tmp_path / "fsdp")[0]
    assert a["opd/teacher_kl"] > 0.1  # a random teacher: far from the student, so the comparison means something
    assert b["opd/teacher_kl"] == pytest.approx(a["opd/teacher_kl"], rel=1e-5)


def test_layout_helpers_without_a_process_group():
    """With one process there is nothing to shard or synchronise: the helpers are no-ops, not errors."""
    import parallel

    model = torch.nn.Linear(2, 2)
    assert parallel.wrap_student(model, "fsdp", torch.device("cpu")) is model
    assert parallel.wrap_student(model, "ddp", torch.device("cpu")) is model
    assert parallel.comm_device() == torch.device("cpu")
    assert parallel.all_gather_numbers([1.5, 2.0]) == [[1.5, 2.0]] and parallel.all_gather_objects("x") == ["x"]
    assert parallel.any_rank(True, True) is True and parallel.any_rank(False, True) is False
    assert parallel.max_over_ranks(3, True) == 3
    with pytest.raises(ValueError, match="no decoder layers"):
        parallel.decoder_layers(model)


# ------------------------------------------------------------------------------- the CUDA rules, checked on the CPU

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather",
               "gather_object", "scatter", "scatter_object_list", "barrier", "send", "recv"}


def test_every_collective_goes_through_parallel():
    """NCCL serves CUDA tensors only; a collective handed a CPU tensor crashes the first multi-GPU run (as
    eval_aime's CPU float64 counts did). The rule that makes the class impossible: only parallel.py calls
    torch.distributed's collectives, and its helpers put the tensor on the group's device (comm_device). No other
    file of the repository may call one."""
    import ast

    offenders = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name == "parallel.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                base = node.func.value
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if name in ("dist", "distributed"):
                    offenders.append(f"{path.name}:{node.lineno} {name}.{node.func.attr}")
    assert offenders == []


_COMM_DEVICE = """
import os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import parallel
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
torch.cuda.current_device = lambda: 0  # a CPU build has no CUDA device to ask; the rule is what is tested
dist.init_process_group(backend=sys.argv[1])
print("comm_device", parallel.comm_device())
try:
    dist.all_reduce(torch.ones(1))  # what eval_aime did: a CPU tensor straight to the group
    print("cpu tensor accepted")
except RuntimeError as e:
    print("cpu tensor refused:", str(e)[:80])
dist.destroy_process_group()
"""


@pytest.mark.parametrize("backend, device", [("cuda:gloo", "cuda:0"), ("gloo", "cpu")])
def test_collectives_run_on_the_device_the_backend_serves(tmp_path, backend, device):
    """`cuda:gloo` registers gloo for CUDA tensors only: on the CPU it behaves as NCCL does (a CPU tensor is refused,
    shown here as the precondition). parallel.comm_device() reads the device from the group itself, so the helpers
    move their tensors to CUDA under NCCL and leave them on the CPU under gloo."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "comm_device.py"
    script.write_text(_COMM_DEVICE.format(root=str(ROOT)))
    out = subprocess.run([sys.executable, str(script), backend, str(port)], capture_output=True, text=True,
                         timeout=120).stdout
    assert f"comm_device {device}" in out, out
    assert ("cpu tensor refused" in out) == (backend == "cuda:gloo"), out


def test_fsdp_mixed_precision_follows_the_dtype_flag():
    """--parallel fsdp on CUDA with --dtype float32 got bf16 all-gathers anyway (the policy came from the device
    kind). The policy comes from the run's compute dtype: fp32 casts nothing, bf16 computes in bf16; gradients are
    always reduced in fp32."""
    import parallel

    fp32, bf16 = parallel.fsdp_policy(torch.float32), parallel.fsdp_policy(torch.bfloat16)
    assert fp32.param_dtype is None and bf16.param_dtype == torch.bfloat16
    assert fp32.reduce_dtype == bf16.reduce_dtype == torch.float32
    import train
    assert train.resolve_dtype("float32", "cuda") == torch.float32 and train.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert train.resolve_dtype("auto", "cpu") == torch.float32 and train.resolve_dtype("bfloat16", "cpu") == torch.bfloat16


_SHARDED_LOAD = """
import os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
import parallel
dist.init_process_group("gloo")
rank = dist.get_rank()
loads = []
real = AutoModelForCausalLM.from_pretrained
AutoModelForCausalLM.from_pretrained = lambda *a, **k: loads.append(a[0]) or real(*a, **k)
for role, shard in (("student", parallel.shard_student), ("teacher", parallel.shard_teacher)):
    path = sys.argv[1] + "/" + role
    model = parallel.from_pretrained(path, torch.float32, torch.device("cpu"), shard=shard)
    whole = {{n for n, p in model.named_parameters() if not hasattr(p, "full_tensor")}}
    local = sum(p.to_local().numel() if hasattr(p, "full_tensor") else p.numel() for p in model.parameters())
    state = parallel.full_state_dict(model)
    if rank == 0:
        ref = real(path)
        same = all(torch.equal(state[k], v) for k, v in ref.state_dict().items() if k in state)
        buffers = all(torch.equal(b, dict(ref.named_buffers())[n]) for n, b in model.named_buffers())
        total = sum(p.numel() for p in ref.parameters())
        print(f"{{role}}: weights equal {{same}}, buffers equal {{buffers}}, eos {{model.generation_config.eos_token_id}}")
    print(f"rank {{rank}} {{role}}: loads {{len(loads)}}, whole {{sorted(whole)}}, local {{local}}", flush=True)
    loads.clear()
if rank == 0:
    print("total", total)
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_loading_never_puts_a_whole_model_on_a_rank_that_shards_it(fast_world, tmp_path):
    """FSDP loading built the full fp32 student and the full bf16 teacher on every rank before sharding them (~77 GB
    per rank for the paper's pair). Now every rank builds on the meta device and shards; only rank 0 reads the
    checkpoint (into CPU memory) and sends each rank its shards: the other ranks never call from_pretrained, every
    sharded parameter is a shard, and the result is the checkpoint exactly (weights, rotary buffers, stop ids). The
    teacher's embedding and LM head stay whole, as the fused head needs."""
    world, _ = fast_world
    script = tmp_path / "load.py"
    script.write_text(_SHARDED_LOAD.format(root=str(ROOT)))
    proc = _run([str(world)], nproc=2, timeout=300, script=script)
    out = proc.stdout
    for role in ("student", "teacher"):
        assert f"{role}: weights equal True, buffers equal True, eos 2" in out, out
        assert f"rank 1 {role}: loads 0, " in out and f"rank 0 {role}: loads 1, " in out, out
    assert "rank 1 student: loads 0, whole [], " in out  # every parameter of the student a shard
    assert "whole ['lm_head.weight', 'model.embed_tokens.weight']" in out or \
        "whole ['model.embed_tokens.weight']" in out  # the teacher's head and embedding whole (tied: one)
    total = int(out.split("total ")[1].split()[0])
    local = [int(line.split("local ")[1]) for line in out.splitlines() if line.startswith("rank 1 student")]
    assert local[0] <= total // 2 + 1024  # half the student, give or take the shards' padding


_COUNT_GATHERS = """
import os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import train
calls = [0]
real = dist.all_gather_single
def counting(*args, **kwargs):
    calls[0] += 1
    return real(*args, **kwargs)
dist.all_gather_single = counting  # FSDP2's all-gather of a shard group's parameters
train.main(sys.argv[1:])
print(f"rank {{os.environ['RANK']}}: {{calls[0]}} all-gathers", flush=True)
"""


def test_fsdp_gathers_the_student_once_for_the_rollouts(fast_world, tmp_path):
    """Under FSDP every forward all-gathers each layer it runs: one per layer per generated token while sampling.
    --unshard-rollouts (the default) gathers the student once for the rollout phase and reshards it before the
    learner's forward: far fewer all-gathers, and exactly the same training (the same weights after the step)."""
    world, _ = fast_world
    driver = tmp_path / "count.py"
    driver.write_text(_COUNT_GATHERS.format(root=str(ROOT)))
    counts = {}
    for flag in ("--unshard-rollouts", "--no-unshard-rollouts"):
        out = tmp_path / flag.strip("-")
        args = _args(world, out, "--steps", "1", "--rollout-batch", "4", "--micro-batch", "2", "--mode", "opd",
                     "--max-new-tokens", "16", "--eval-every", "0", "--no-self-check", "--parallel", "fsdp", flag)
        proc = _run(args, nproc=2, timeout=300, script=driver)
        counts[flag] = int(proc.stdout.split("rank 0: ")[1].split()[0])
    assert counts["--unshard-rollouts"] * 3 < counts["--no-unshard-rollouts"], counts
    a = _weights(tmp_path / "unshard-rollouts" / "ckpt-000001")
    b = _weights(tmp_path / "no-unshard-rollouts" / "ckpt-000001")
    assert all(torch.equal(a[k], b[k]) for k in a)
