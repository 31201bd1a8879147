"""Corpus embedding time: a ViT-B/16-sized CLIP text tower over the WordNet corpus.

Times :func:`oodprobe.corpus.corpus_embeddings` (the cached path a run takes: encode, write
shards, join them, verify) with one prompt and with the five-prompt ensemble, on a random
sample of the corpus (or all of it with ``--sample 0``), then extrapolates to the whole corpus
(time grows linearly in the number of texts: every text is padded to the 77-token context).
A second call on the same sample is timed too: the cache read. Weights are random
(``openclip:ViT-B-16/random``): the architecture, not the weights, sets the time.

    .venv/bin/python benchmarks/corpus_embedding.py                     # CPU, 5,000 terms
    .venv/bin/python benchmarks/corpus_embedding.py --device cuda --sample 0
    .venv/bin/python benchmarks/corpus_embedding.py --corpus words.txt  # a corpus file
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from oodprobe.corpus import corpus_embeddings, load_corpus, make_corpus
from oodprobe.encoders import create_encoder
from oodprobe.encoders.text import PROMPT_SETS
from oodprobe.features import select_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="wordnet", help="corpus name or file")
    parser.add_argument("--encoder", default="openclip:ViT-B-16/random")
    parser.add_argument("--sample", type=int, default=5000, help="terms timed (0: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--prompts", default="single,ensemble", help="prompt sets, in order")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/corpus_embedding.json")
    )
    args = parser.parse_args()

    started = time.perf_counter()
    corpus = load_corpus(args.corpus)
    load_seconds = time.perf_counter() - started
    sample = corpus
    if 0 < args.sample < len(corpus):
        terms = random.Random(0).sample(list(corpus.terms), args.sample)
        sample = make_corpus(terms, name=f"{corpus.name}-sample", source=corpus.source)
    device = select_device(args.device)
    encoder = create_encoder(args.encoder)
    encoder.eval().to(device)
    print(
        f"{corpus.name}: {len(corpus)} terms (loaded in {load_seconds:.1f} s); timing "
        f"{len(sample)} on {device} ({torch.get_num_threads()} threads), {args.encoder}, "
        f"batch {args.batch_size}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache_root:
        for prompt_set in args.prompts.split(","):
            prompts = PROMPT_SETS[prompt_set]
            started = time.perf_counter()
            corpus_embeddings(
                encoder,
                sample,
                prompts,
                cache_root=Path(cache_root),
                batch_size=args.batch_size,
                progress=False,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            corpus_embeddings(encoder, sample, prompts, cache_root=Path(cache_root))
            cached_seconds = time.perf_counter() - started
            texts = len(sample) * len(prompts)
            full = seconds * len(corpus) / len(sample)
            rows.append(
                {
                    "prompts": prompt_set,
                    "n_prompts": len(prompts),
                    "terms_timed": len(sample),
                    "texts_per_second": texts / seconds,
                    "seconds_timed": seconds,
                    "seconds_cached_read": cached_seconds,
                    "corpus_terms": len(corpus),
                    "seconds_full_corpus": full,
                    "extrapolated": len(sample) < len(corpus),
                }
            )
            print(
                f"  {prompt_set:9s} ({len(prompts)} prompts): {len(sample)} terms in "
                f"{seconds:.1f} s ({texts / seconds:.0f} texts/s); whole corpus "
                f"{'≈ ' if len(sample) < len(corpus) else ''}{full / 60:.1f} min; cached read "
                f"{cached_seconds:.2f} s"
            )
    record = {
        "corpus": corpus.name,
        "corpus_source": corpus.source,
        "encoder": args.encoder,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
