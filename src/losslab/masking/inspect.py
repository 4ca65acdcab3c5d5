"""``losslab inspect``: show which tokens of a dataset are trained, and with what weight.

Formats: ``text`` (terminal: trained tokens highlighted, weights other than 1 shown after
their run; without colour trained runs are wrapped in « »), ``html`` (a self-contained page,
text escaped, trained tokens coloured by weight, token id and weight on hover) and ``jsonl``
(one contract object per sequence: ``source``, ``input_ids``, ``labels``, ``weights``).
The summary line (samples, tokens, trained tokens, dropped samples, skipped records,
strategy chosen) goes to stderr, and into the HTML page.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig, MaskedSequence

TRAINED = "\x1b[30;42m"  # black on green
DIM = "\x1b[2m"
WEIGHT = "\x1b[33m"  # yellow
RESET = "\x1b[0m"


def pieces(seq: MaskedSequence) -> Iterator[tuple[str, int, bool, float]]:
    """``(text, token id, trained, weight)`` per token; the text comes from the character
    offsets, so a character split over several byte tokens is shown once, with the first."""
    cursor = seq.offsets[0][0] if seq.offsets else 0
    for tok, (start, end), label, weight in zip(seq.input_ids, seq.offsets, seq.labels, seq.weights):
        yield (seq.text[max(start, cursor) : end] if end > cursor else ""), tok, label != IGNORE_INDEX, weight
        cursor = max(cursor, end)


def runs(seq: MaskedSequence) -> Iterator[tuple[str, bool, float]]:
    """``(text, trained, weight)`` for maximal runs of tokens with the same mask and weight."""
    for (trained, weight), group in itertools.groupby(pieces(seq), key=lambda p: (p[2], p[3])):
        yield "".join(p[0] for p in group), trained, weight


def _header(seq: MaskedSequence) -> str:
    turn = f", message {seq.turn + 1}" if seq.turn is not None else ""
    return f"── {seq.source}{turn}: {len(seq.input_ids)} tokens, {seq.trained} trained"


def format_text(seq: MaskedSequence, *, color: bool) -> str:
    out = [_header(seq), "\n"]
    for text, trained, weight in runs(seq):
        note = "" if not trained or weight == 1.0 else f"{{{weight:g}}}"
        if color:
            style = TRAINED if trained else DIM
            # re-open the style after each newline so the highlight never bleeds into the margin
            out.append(style + text.replace("\n", RESET + "\n" + style) + RESET)
            out.append(f"{WEIGHT}{note}{RESET}" if note else "")
        else:
            out.append(f"«{text}»{note}" if trained else text)
    out.append("\n")
    return "".join(out)


_HTML_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>losslab inspect</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
pre { white-space: pre-wrap; word-break: break-all; font-family: monospace; border: 1px solid #ddd; padding: .6em; }
.u { color: #888; }
.t { color: #000; border-radius: 2px; }
h2 { font-size: 1em; margin-top: 1.4em; }
</style></head><body>
"""


def format_html(seqs: Iterable[MaskedSequence], stats: BuildStats, *, title: str) -> str:
    seqs = list(seqs)
    top = max((w for s in seqs for w in s.weights), default=1.0) or 1.0
    body = [_HTML_HEAD, f"<h1>{html.escape(title)}</h1>"]
    body.append(f'<p class="summary">{html.escape(stats.summary())}</p>')
    body.append("<p>Trained tokens are green, darker for a larger weight; hover a token for its id and weight.</p>")
    for seq in seqs:
        body.append(f"<h2>{html.escape(_header(seq))}</h2><pre>")
        for text, tok, trained, weight in pieces(seq):
            piece = html.escape(text)
            if not trained:
                body.append(f'<span class="u" title="token {tok}: not trained">{piece}</span>')
            else:
                alpha = 0.2 + 0.8 * min(weight / top, 1.0)
                body.append(
                    f'<span class="t" style="background: rgba(40,167,69,{alpha:.2f})" '
                    f'title="token {tok}: weight {weight:g}">{piece}</span>'
                )
        body.append("</pre>")
    body.append("</body></html>\n")
    return "".join(body)


def format_jsonl(seq: MaskedSequence) -> str:
    return json.dumps(seq.to_sample(), ensure_ascii=False) + "\n"


def parse_role_weights(items: Iterable[str] | None) -> dict[str, float]:
    """``["user=0.5", ...]`` -> ``{"user": 0.5}``."""
    out = {}
    for item in items or ():
        role, sep, value = item.partition("=")
        try:
            out[role.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--role-weight expects ROLE=WEIGHT (e.g. user=0.5); got {item!r}")
    return out


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """Standard output, or ``path`` written through a temporary file renamed into place once
    everything is written: a bad record met halfway leaves an existing file as it was."""
    if path is None:
        yield sys.stdout
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fh = open(tmp, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def config_from_args(args: argparse.Namespace) -> MaskConfig:
    return MaskConfig(
        mask=args.mask,
        strategy=args.strategy,
        mask_prompt=not args.no_mask_prompt,
        role_weights=parse_role_weights(getattr(args, "role_weight", None)),
        prompt_style=args.prompt_style,
        template=args.template,
        max_length=args.max_length,
        truncation=args.truncation,
        on_error=args.on_error,
    )


def run_inspect(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    builder = MaskBuilder(args.tokenizer, config)
    stats = BuildStats()
    seqs = builder.iter_sequences(args.data, stats, limit=args.limit)
    color_opt = getattr(args, "color", "auto")
    with _output(args.out) as out:
        if args.format == "html":
            out.write(format_html(seqs, stats, title=f"losslab inspect {args.data}"))
        elif args.format == "jsonl":
            for seq in seqs:
                out.write(format_jsonl(seq))
        else:
            color = color_opt == "always" or (
                color_opt == "auto" and args.out is None and out.isatty() and "NO_COLOR" not in os.environ
            )
            for seq in seqs:
                out.write(format_text(seq, color=color))
    print(f"losslab inspect: {stats.summary()}", file=sys.stderr)
    return 0
