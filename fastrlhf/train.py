"""`python -m fastrlhf.train {sft,rm,dpo,kto,ppo,grpo,pipeline} [--config file.yaml] [--key value ...]`

With no subcommand it runs `pipeline`: SFT -> reward model -> PPO and DPO on the built-in demo task
with SmolLM2-135M-Instruct, then a table comparing the policies (see fastrlhf.pipeline).
Each stage also runs alone on your model and data, e.g.

    python -m fastrlhf.train sft --model PATH --data sft.jsonl --output-dir out/sft
    python -m fastrlhf.train rm  --model out/sft/merged --data pairs.jsonl --output-dir out/rm
    python -m fastrlhf.train ppo --model out/sft/merged --data prompts.jsonl --reward-model out/rm --output-dir out/ppo
    python -m fastrlhf.train dpo --model out/sft/merged --data pairs.jsonl --output-dir out/dpo
    python -m fastrlhf.train kto --model out/sft/merged --data unpaired.jsonl --output-dir out/kto
    python -m fastrlhf.train grpo --model out/sft/merged --data prompts.jsonl --reward-fn fastrlhf.demo:gold_reward_fn
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fastrlhf.cli import CliError, Command, build_parser, parse_args
from fastrlhf.guards import NonFiniteStop
from fastrlhf.options import (
    DataOptions,
    ModelOptions,
    PolicyOutputOptions,
    RewardOptions,
)
from fastrlhf.pipeline import PipelineOptions, run_pipeline
from fastrlhf.planner.cli import PlanOptions, run_plan
from fastrlhf.planner.spec import STAGES as PLANNED_STAGES
from fastrlhf.stage import DATA_FORMATS, DATA_KINDS, run_stage, trainer_classes


def commands() -> dict[str, Command]:
    data_help = {k: f"\ndata format ({DATA_KINDS[k]}), one record per line of a .jsonl file:\n  {DATA_FORMATS[DATA_KINDS[k]]}"
                 for k in DATA_KINDS}
    stages = {
        "sft": Command("supervised fine-tuning of the policy (LoRA by default)",
                       (ModelOptions, DataOptions, PolicyOutputOptions, trainer_classes("sft")[1]),
                       epilog=data_help["sft"] + "\nexample:\n  python -m fastrlhf.train sft --data sft.jsonl --output-dir out/sft"),
        "rm": Command("reward model: reward adapter + score head, Bradley-Terry loss on preference pairs",
                      (ModelOptions, DataOptions, trainer_classes("rm")[1]),
                      epilog=data_help["rm"] + "\nexample:\n  python -m fastrlhf.train rm --model out/sft/merged --data pairs.jsonl --output-dir out/rm"),
        "dpo": Command("direct preference optimisation (and IPO, hinge, robust, SimPO, ORPO) of the policy",
                       (ModelOptions, DataOptions, PolicyOutputOptions, trainer_classes("dpo")[1]),
                       epilog=data_help["dpo"] + "\nexample:\n  python -m fastrlhf.train dpo --model out/sft/merged --data pairs.jsonl --output-dir out/dpo"),
        "kto": Command("KTO of the policy on unpaired data: each completion labelled desirable or not "
                       "(and apo_zero_unpaired)",
                       (ModelOptions, DataOptions, PolicyOutputOptions, trainer_classes("kto")[1]),
                       epilog=data_help["kto"] + "\nexample:\n  python -m fastrlhf.train kto --model out/sft/merged "
                              "--data unpaired.jsonl --output-dir out/kto"),
        "ppo": Command("PPO of the policy (+ value role) against a reward model or a reward function, KL to the reference",
                       (ModelOptions, DataOptions, RewardOptions, PolicyOutputOptions, trainer_classes("ppo")[1]),
                       epilog=data_help["ppo"] + "\nexample:\n  python -m fastrlhf.train ppo --model out/sft/merged --data prompts.jsonl "
                              "--reward-model out/rm --output-dir out/ppo"),
        "grpo": Command("GRPO of the policy: group-normalised rewards, no value model",
                        (ModelOptions, DataOptions, RewardOptions, PolicyOutputOptions, trainer_classes("grpo")[1]),
                        epilog=data_help["grpo"] + "\nexample:\n  python -m fastrlhf.train grpo --model out/sft/merged --data prompts.jsonl "
                               "--reward-fn fastrlhf.demo:gold_reward_fn --output-dir out/grpo"),
        "pipeline": Command("the whole demo: SFT -> sample pairs, label them with the gold reward -> RM -> PPO and DPO "
                            "-> evaluation table (the default when no subcommand is given)",
                            (ModelOptions, PipelineOptions)),
    }
    for name in PLANNED_STAGES:  # --plan prints the predicted GPU memory instead of training
        stages[name].option_classes += (PlanOptions,)
    return stages

def main(argv: Sequence[str] | None = None) -> int:
    cmds = commands()
    parser = build_parser(
        cmds,
        description="fastrlhf trainers. With no subcommand, runs `pipeline` (the built-in demo).",
        epilog="`python -m fastrlhf.train SUBCOMMAND --help` lists every option of a stage with its default.",
    )
    command, options = parse_args(parser, argv, default_command="pipeline")
    subparser_error = _subparser(parser, command).error
    try:
        plan = options.get(PlanOptions)
        if plan is not None and plan.plan:
            return run_plan(command, options)
        if command == "pipeline":
            run_pipeline(options[ModelOptions], options[PipelineOptions])
        else:
            run_stage(command, options)
    except CliError as error:
        subparser_error(str(error))
    except NonFiniteStop as error:  # the run diverged: what happened and what to try, no traceback
        print(f"{_subparser(parser, command).prog}: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the trainer saved what it could; no traceback
        print("interrupted: the same command with --resume auto continues from the last checkpoint",
              file=sys.stderr, flush=True)
        return 130
    return 0

def _subparser(parser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


if __name__ == "__main__":
    sys.exit(main())
