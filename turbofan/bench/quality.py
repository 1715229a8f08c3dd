"""What low-bit serving costs in quality: teacher-forced perplexity and top-1 agreement against float32.

    python -m turbofan.bench.quality [--models smollm2:135m,gemma3:270m] [--quantization auto]

Both runs read the same fixed English text (~500 tokens) in one prefill; agreement is the share of positions
where the quantized model's most likely next token equals the float32 model's.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT = """The history of the bicycle is a story of small improvements that added up to a machine almost everyone
can use. The first two-wheeled vehicles, built in the early nineteenth century, had no pedals at all: riders
pushed themselves along with their feet, like children on a balance bike today. Later designs put cranks and
pedals on the front wheel, and because one turn of the pedals moved the bicycle only as far as the wheel's
circumference, makers built front wheels taller and taller to go faster. These high wheelers were quick but
dangerous, since a rider sat far above the ground and could be thrown over the handlebars by a single stone.

The safety bicycle changed everything. It had two wheels of equal size, a chain that drove the rear wheel, and
gearing that let a small wheel cover as much ground as a large one. Soon afterwards came the pneumatic tyre,
which made riding on rough roads far more comfortable. Within a few years, millions of people who had never
owned a horse or a carriage could travel across a city, or between villages, under their own power. Women in
particular found a new independence, and the bicycle played a part in changing ideas about clothing, work and
public life.

Engineers kept refining the design throughout the twentieth century. Lighter steel tubes, and later aluminium
and carbon fibre, reduced weight. Derailleur gears allowed riders to choose among many ratios while moving, so
that steep hills and long flat roads could both be ridden at a comfortable cadence. Brakes moved from simple
pads pressed against the tyre to rim brakes and then to disc brakes that work well in the rain. Each change was
modest on its own, but together they produced a machine that is efficient, reliable and cheap to maintain.

Today the bicycle is again at the centre of discussions about cities. Planners measure how many people could
reach work in twenty minutes by bike, and build protected lanes where traffic is heavy. Electric assistance has
widened the range of riders and distances, since a small motor can flatten a hill or carry a child to school.
Yet the basic idea remains the one that made the safety bicycle a success: a light frame, two equal wheels, a
chain and a person turning the pedals. It is a reminder that good engineering often means removing what is not
needed until only the essential parts remain, and then making those parts a little better every year."""


@dataclass
class Quality:
    tokens: int
    ppl_float32: float
    ppl_quantized: float
    agreement: float
    served_as: str

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_quantized / self.ppl_float32


def _teacher_forced(model_path: Path, quantization: str, ids: list[int]) -> tuple[torch.Tensor, str]:
    """Log-probabilities [len(ids) - 1, vocab] of each next token, from one prefill over the whole text."""
    from turbofan.model.batch import ForwardBatch
    from turbofan.model.runner import ModelRunner

    bs = 16
    blocks = (len(ids) + bs - 1) // bs
    runner = ModelRunner(model_path, block_size=bs, num_blocks=blocks + 1, quantization=quantization)
    batch = ForwardBatch.build([ids], [0], [list(range(blocks))], [list(range(len(ids) - 1))], bs)
    return runner.execute(batch).log_softmax(-1), runner.quantization


def measure(model_path: Path, quantization: str = "auto", text: str = TEXT) -> Quality:
    from turbofan.model.tokenizer import Tokenizer

    ids = Tokenizer(model_path).encode(text)
    target = torch.tensor(ids[1:])
    ref, _ = _teacher_forced(model_path, "none", ids)
    got, served = _teacher_forced(model_path, quantization, ids)

    def ppl(logp: torch.Tensor) -> float:
        return math.exp(-float(logp.gather(1, target[:, None]).mean()))

    agreement = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    return Quality(len(ids), ppl(ref), ppl(got), agreement, served)


def main(argv: list[str] | None = None) -> None:
    from turbofan import kernels
    from turbofan.store import resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2:135m,gemma3:270m")
    p.add_argument("--quantization", default="auto", choices=["auto", "int8", "int4"])
    args = p.parse_args(argv)
    print(kernels.cpu_summary())
    print("| model | served as | tokens | ppl float32 | ppl quantized | ratio | top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        q = measure(Path(resolve_model(name).path), args.quantization)
        print(
            f"| {name} | {q.served_as} | {q.tokens} | {q.ppl_float32:.3f} | {q.ppl_quantized:.3f} | "
            f"{q.ppl_ratio:.4f} | {q.agreement:.1%} |"
        )


if __name__ == "__main__":
    main()
