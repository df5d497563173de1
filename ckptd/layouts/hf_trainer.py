"""Hugging Face `transformers.Trainer`: `<output_dir>/checkpoint-<global_step>/`.

What one save writes (transformers 4.57 and 5.24, in this order): config.json, generation_config.json, the
weights (model.safetensors; sharded with model.safetensors.index.json, written last of them; or
pytorch_model.bin, sharded with its index; adapter files for PEFT; a DeepSpeed `global_step<N>/` tag folder
with `latest` under DeepSpeed), training_args.bin, optimizer.pt, scheduler.pt, scaler.pt (fp16),
rng_state.pth (rng_state_<rank>.pth with several ranks), then trainer_state.json, last and written in place.
No temp folder is used (4.36-era Trainers staged into `tmp-checkpoint-<N>`: that is in progress, never done).
With `enable_jit_checkpoint`, `checkpoint-is-incomplete.txt` is present while the save runs.

The run is `output_dir`. `trainer.train(resume_from_checkpoint=<checkpoint-N folder>)` resumes from one.
Rotation (`save_total_limit`) globs `checkpoint-*` folders and orders them by mtime: ckptd writes nothing
inside them, and its sidecar beside one (`checkpoint-40.ckptd.json`) is a file, which the glob skips.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ckptd.layouts import NUMPY_ARRAYS, Member, Reader, deepspeed, writing
from ckptd.metadata import Extracted, capped_metrics, scalar, sibling_name

NAME = re.compile(r"^(?:tmp-)?checkpoint-(\d+)$")
INCOMPLETE_MARK = "checkpoint-is-incomplete.txt"
STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
           "adapter_model.safetensors", "adapter_model.bin", "pytorch_model_fsdp.bin")  # fmt: skip

# training_args.bin pickles the TrainingArguments dataclass and the enums it holds (transformers 4.57 to 5.24,
# accelerate 1.x). ckptd never unpickles it; these names only mark it as the Trainer's normal file. A subclass
# of TrainingArguments (Seq2SeqTrainingArguments is here; trl's configs are not) needs `trusted_globals`.
TRAINING_ARGS = frozenset({
    "transformers.training_args.TrainingArguments", "transformers.training_args.OptimizerNames",
    "transformers.training_args_seq2seq.Seq2SeqTrainingArguments",
    "transformers.trainer_utils.SchedulerType", "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy", "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.FSDPOption", "transformers.trainer_pt_utils.AcceleratorConfig",
    "transformers.debug_utils.DebugOption", "transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig",
    "transformers.integrations.deepspeed.HfDeepSpeedConfig", "accelerate.state.PartialState",
    "accelerate.utils.dataclasses.DistributedType", "accelerate.utils.dataclasses.DeepSpeedPlugin",
})  # fmt: skip
_RNG = re.compile(r"^rng_state(_\d+)?\.pth$")
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
# log_history keys that describe the run's speed or size, not the model at that step
_NOT_METRICS = frozenset({"epoch", "step", "total_flos", "num_input_tokens_seen"})


class HfTrainer:
    """transformers.Trainer's `checkpoint-<step>/`."""

    name = "hf_trainer"

    def sidecar_in_state(self, folder: Path) -> bool:
        return False

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        return NAME.match(folder.name) is not None

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        if folder.name.startswith("tmp-") or INCOMPLETE_MARK in names or STATE not in names or writing(names):
            return False
        return any(w in names for w in WEIGHTS) or any(n.startswith("global_step") for n in names)

    def run_of(self, folder: Path) -> Path:
        return folder.parent

    def member(self, rel: str) -> Member:
        name = rel.rsplit("/", 1)[-1]
        if rel == STATE:
            return Member("record")
        if _WEIGHT_FILE.match(name) and "/" not in rel:
            return Member("weights")
        if name == "training_args.bin":
            return Member("state", TRAINING_ARGS)
        if _RNG.match(name):
            return Member("state", NUMPY_ARRAYS)
        if name.endswith(("_optim_states.pt", "_model_states.pt")):  # a DeepSpeed tag folder (HF with DeepSpeed)
            return Member("weights" if name.endswith("_model_states.pt") else "optimizer", deepspeed.STATE)
        if re.match(r"^optimizer(_\d+)?\.(pt|bin)$", name) and "/" not in rel:  # FSDP: optimizer_0.bin
            return Member("optimizer")
        if name.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return Member("state")
        return Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        """global_step and epoch from trainer_state.json, and the metrics logged at that step (eval_loss...)."""
        step_from_name = NAME.match(folder.name)
        state = read.json(STATE)
        if not isinstance(state, dict):
            return Extracted(global_step=int(step_from_name[1]) if step_from_name else None, producer="huggingface")
        step = _integer(state.get("global_step"))
        if step is None and step_from_name:
            step = int(step_from_name[1])
        epoch = scalar(state.get("epoch"))
        metrics: dict[str, float] = {}
        history = state.get("log_history")
        for record in history if isinstance(history, list) else []:
            if isinstance(record, dict) and _integer(record.get("step")) == step:
                for key, value in record.items():
                    number = scalar(value)
                    if number is not None and key not in _NOT_METRICS and not key.endswith(("_runtime", "per_second")):
                        metrics[str(key)] = number
        best = scalar(state.get("best_metric"))
        if best is not None:
            metrics["best_metric"] = best
        kept, notes = capped_metrics(metrics)
        best_checkpoint = sibling_name(state.get("best_model_checkpoint"))  # load_best_model_at_end loads it
        return Extracted(
            epoch=math.floor(epoch) if epoch is not None and math.isfinite(epoch) else None, global_step=step,
            metrics=kept, producer="huggingface", keys=sorted(str(k) for k in state)[:200], notes=notes,
            needs=[best_checkpoint] if best_checkpoint and best_checkpoint != folder.name else [],
        )  # fmt: skip


def _integer(value: object) -> int | None:
    number = scalar(value)
    return int(number) if number is not None and math.isfinite(number) and number == int(number) else None


LAYOUT = HfTrainer()
