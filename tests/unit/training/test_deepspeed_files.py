"""Which optimizer files a checkpoint reader opens is decided by the files present, not by the
ZeRO stage: DeepSpeed's BF16_Optimizer writes `bf16_`-prefixed flat partitions under ZeRO 1
too (a bf16 run with fp32 gradient accumulation)."""
import torch

from slope_megatron.training.checkpoint.deepspeed_files import FileLayout, read_param_groups

GROUPS = [{"params": [0, 1], "lr": 1e-3, "weight_decay": 0.1, "lr_scale": 1.0},
          {"params": [2], "lr": 1e-3, "weight_decay": 0.0, "lr_scale": 0.5}]


def _flat_optim_file(path):
    torch.save({"optimizer_state_dict": {"base_optimizer_state": {"param_groups": GROUPS}}},
               path)


def _without_params(groups):
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def test_zero1_reads_the_bf16_optimizer_files_when_those_are_what_it_wrote(tmp_path):
    _flat_optim_file(tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    got = read_param_groups(tmp_path, FileLayout(tp=1, pp=1, dp=1, stage=1))
    assert got == _without_params(GROUPS)


def test_zero2_reads_the_plain_flat_partition_files(tmp_path):
    _flat_optim_file(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    got = read_param_groups(tmp_path, FileLayout(tp=1, pp=1, dp=2, stage=2))
    assert got == _without_params(GROUPS)
