"""Convert a Hugging Face causal LM to ASEntmax attention and fine-tune it on sparsa's copy task.

    python examples/finetune_transformers.py                        # a tiny random Llama, CPU, ~1 minute
    python examples/finetune_transformers.py --model Qwen/Qwen2.5-0.5B --steps 200 --device cuda

The task's tokens are used as token ids directly (0..vocab+3), which any
model's vocabulary contains; a pretrained model thus learns the task from
scratch in its own embedding space. Needs ``pip install 'sparsa[transformers]'``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import transformers

from sparsa.experiments.data import evaluation_examples, training_batch
from sparsa.integrations.transformers import from_pretrained, sparsify
from sparsa.tasks import IGNORE, make_task


def tiny_llama(vocab_size: int) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config)


def exact_match(model, task, length: int, count: int, device: str) -> float:
    """Greedy generation (KV cache) of each answer, compared token by token."""
    correct = 0
    for example in evaluation_examples(task, seed=0, split="test", length=length, count=count):
        prompt = torch.tensor(example.tokens[: example.prompt], device=device)[None]
        answer = torch.tensor(example.answer, device=device)
        out = model.generate(prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=0)
        correct += int(torch.equal(out[0, prompt.shape[1] :], answer))
    return 100 * correct / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a causal LM on the Hub or on disk; default a tiny Llama"
    )
    parser.add_argument("--alpha", type=float, default=1.5, help="entmax alpha")
    parser.add_argument("--scaling", default="asentmax", help="asentmax, ssmax, ... or none")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="results/finetuned", help="where the converted model is saved")
    args = parser.parse_args()

    torch.manual_seed(0)
    task = make_task("copy", vocab=8)
    if args.model is None:
        model = tiny_llama(task.vocab_size)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    sparsify(model, args.alpha, scaling=None if args.scaling == "none" else args.scaling)
    model.to(args.device).train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        batch = training_batch(task, seed=0, step=step, batch_size=32, lengths=(4, 12)).to(args.device)
        logits = model(batch.tokens).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")

    model.eval()
    model.save_pretrained(args.out)
    reloaded = from_pretrained(args.out).to(args.device)
    for length in (12, 24):
        print(f"exact match at {length} symbols: {exact_match(reloaded, task, length, 20, args.device):.0f}%")


if __name__ == "__main__":
    main()
