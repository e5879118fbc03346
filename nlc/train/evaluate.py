"""`nlc eval`: validation loss and bits per byte, and single-needle passkey recall.

Passkey recall (Mohtashami & Jaggi 2023; RULER's S-NIAH-1 is the same test): a 5-digit pass key is
hidden at a chosen depth of repeated filler text, and the prompt ends with "The pass key is"; the
model must continue with the key. Byte level, a prompt of `length` bytes is `length` tokens, so it
is evaluated at lengths beyond the training length. Greedy decoding reproduces the key exactly when
the argmax at each digit, fed the true digits before it, is that digit, so one forward pass scores
both `exact` (all five digits) and `digits` (the fraction right; chance is 0.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE, ByteText

INTRO = (b"There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         b"I will quiz you about the important information there.\n")
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = b"The pass key is %d. Remember it. %d is the pass key. "
QUESTION = b"\nWhat is the pass key? The pass key is "
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DIGITS = 5


@torch.no_grad()
def validation(model, data, batch: int, seq_len: int, max_tokens: int, amp: bool = False) -> dict:
    """Mean loss (nats per scored token), next-token accuracy and, for bytes, bits per byte, over at
    most `max_tokens` validation positions of `data` (a ByteText or TaskSet)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, right, count = 0.0, 0, 0
    for ids, targets in data.val_batches(batch, seq_len, max_tokens):
        ids, targets = ids.to(device), targets.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(ids).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        scored = targets != IGNORE
        right += (logits.argmax(-1) == targets)[scored].sum().item()
        count += scored.sum().item()
    model.train(was_training)
    result = {"val_loss": total / count, "val_accuracy": right / count, "val_tokens": count}
    if isinstance(data, ByteText):
        result["val_bpb"] = result["val_loss"] / math.log(2)
    return result


def passkey_prompt(length: int, depth: float, key: int) -> tuple[bytes, int]:
    """A prompt of exactly `length` bytes: intro, filler with the needle at sentence boundary nearest
    `depth` (0 = first, 1 = last), the question, and the key's digits, which end it. Returns the
    bytes and the index of the key's first digit."""
    needle = NEEDLE % (key, key)
    answer = b"%d" % key
    room = length - len(INTRO) - len(needle) - len(QUESTION) - len(answer)
    if room < 0:
        raise ValueError(f"needle length {length} is shorter than a passkey prompt without filler "
                         f"({length - room} bytes)")
    filler = (FILLER * (room // len(FILLER) + 1))[:room]
    starts = [i for i in range(room + 1) if i == 0 or i == room or filler[i - 2:i] == b". "]
    cut = min(starts, key=lambda i: abs(i - depth * room))
    prompt = INTRO + filler[:cut] + needle + filler[cut:] + QUESTION + answer
    return prompt, length - len(answer)


@torch.no_grad()
def needle_recall(model, lengths, depths=DEPTHS, trials: int = 4, seed: int = 0,
                  batch: int = 8) -> list[dict]:
    """One row per (length, depth): `exact` and `digits` recall over `trials` random pass keys (the
    same keys at every length and depth)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keys = torch.randint(10 ** (DIGITS - 1), 10 ** DIGITS, (trials,),
                         generator=torch.Generator().manual_seed(seed)).tolist()
    rows = []
    for length in lengths:
        for depth in depths:
            hits = []
            for first in range(0, trials, batch):
                prompts = [passkey_prompt(length, depth, key) for key in keys[first:first + batch]]
                ids = torch.tensor([list(p) for p, _ in prompts], device=device)
                at = prompts[0][1]  # the same for every key (all have DIGITS digits)
                guess = model(ids[:, :-1])[:, at - 1:at - 1 + DIGITS].argmax(-1)
                hits.append(guess == ids[:, at:at + DIGITS])
            hit = torch.cat(hits)
            rows.append({"length": length, "depth": depth, "exact": hit.all(-1).float().mean().item(),
                         "digits": hit.float().mean().item(), "trials": trials})
    model.train(was_training)
    return rows


def needle_table(rows: list[dict]) -> str:
    """Recall per length (rows) and depth (columns): exact-key rate / digit accuracy."""
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["length"], r["depth"]): r for r in rows}
    head = ["length"] + [f"depth {d:.0%}" for d in depths] + ["mean"]
    lines = [f"needle recall: exact key / digit accuracy (chance 0.10), {rows[0]['trials']} keys per cell",
             " | ".join(f"{h:>11}" for h in head)]
    for n in lengths:
        here = [cell[n, d] for d in depths]
        mean = {k: sum(r[k] for r in here) / len(here) for k in ("exact", "digits")}
        values = [f"{r['exact']:.2f} / {r['digits']:.2f}" for r in here + [mean]]
        lines.append(" | ".join(f"{v:>11}" for v in [str(n)] + values))
    return "\n".join(lines)
