"""
Data: the GPT-2 tokenizer from the repo's own rank file, and token streams cached as uint16 memmaps.

The built-in corpus is the Python standard library's own source, every .py file under the running
interpreter's stdlib directory except site-packages and test folders: real text that every machine has,
so training needs no download. --data also takes a text file, a directory of text files, or a directory
that already holds train.bin and val.bin.

Files are tokenised in parallel (tiktoken's batch encoding on threads) and joined with <|endoftext|> in
path order. The split into train and val, decided once and cached with the tokens:
  - by file, when there are enough files: a file goes to val when the hash of its path says so (about
    2% of them), so the split never changes and no file is in both;
  - by tokens, when the val files would hold fewer tokens than one sequence (one file, a handful of
    them): the last 2% of the joined stream, and at least one sequence, goes to val.
"""

import hashlib
import json
import os
import sys
import sysconfig
import time

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = os.path.join(HERE, "data", "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256
VOCAB = 50257
VAL_EVERY = 50  # a file goes to val when its path hash is 0 mod 50; the token split keeps 1/50 too
BATCH_BYTES = 32 << 20  # text handed to the tokenizer's threads at a time


def tokenizer():
    """tiktoken's r50k_base (GPT-2 BPE), built from data/r50k_base.tiktoken; tiktoken checks its hash."""
    return tiktoken.Encoding("r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=load_tiktoken_bpe(RANKS, RANKS_SHA256),
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB)


def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return root, files


def is_text(path):
    """Whether the file reads as UTF-8 text (its first 4 KiB, with no NUL); a file that cannot be read at
    all is an error that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            return "\0" not in f.read(4096)
    except UnicodeDecodeError:
        return False
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e


def text_files(root):
    """Every file under root (outside hidden folders) that reads as UTF-8 text, in path order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [p for p in (os.path.join(dirpath, f) for f in sorted(filenames)) if is_text(p)]
    return files


def is_val(relpath):
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % VAL_EVERY == 0


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def tokenise(paths, enc, desc):
    """Each file's tokens then <|endoftext|>, as uint16 arrays, and the tokens/s. The files go to the
    tokenizer's threads in batches of about BATCH_BYTES, with a progress bar over their bytes."""
    out, batch, pending, count = [], [], 0, 0
    bar = tqdm(total=sum(os.path.getsize(p) for p in paths), desc=desc, unit="B", unit_scale=True)
    start = time.perf_counter()

    def flush():
        nonlocal count, pending
        for toks in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1):
            out.append(np.array(toks + [EOT], dtype=np.uint16))
            count += len(toks) + 1
        bar.update(pending)
        bar.set_postfix(tok_s=f"{count / (time.perf_counter() - start):,.0f}")
        batch.clear()
        pending = 0
    for p in paths:
        batch.append(read_text(p))
        pending += os.path.getsize(p)
        if pending >= BATCH_BYTES:
            flush()
    flush()
    bar.close()
    return out, count / max(time.perf_counter() - start, 1e-9)


def split(relpaths, tokens, min_val):
    """(train, val, how): by file if the val files hold at least min_val tokens and the rest too, else
    by tokens (the last 2% of the joined stream, at least min_val)."""
    val_files = [is_val(r) for r in relpaths]
    n_val = sum(len(t) for t, v in zip(tokens, val_files) if v)
    n_all = sum(len(t) for t in tokens)
    if n_val >= min_val and n_all - n_val >= min_val:
        pick = lambda want: np.concatenate([t for t, v in zip(tokens, val_files) if v == want])
        return pick(False), pick(True), f"by file ({sum(val_files)} of {len(relpaths)} files in val)"
    stream = np.concatenate(tokens)
    cut = len(stream) - max(len(stream) // VAL_EVERY, min_val)
    if cut < min_val:
        raise ValueError(f"too little text: {len(stream)} tokens, and a split needs a sequence (--seq_len="
                         f"{min_val}) on each side: give more text or a shorter --seq_len")
    why = f"the val files would hold {n_val} tokens" if len(relpaths) > 1 else "one file"
    return stream[:cut], stream[cut:], f"by tokens ({why}, fewer than a sequence: the last {len(stream) - cut} go to val)"


def write_bin(path, tokens):
    with open(path + ".tmp", "wb") as f:
        tokens.tofile(f)
    os.replace(path + ".tmp", path)


def save(out_dir, meta, train, val):
    """Write train.bin, val.bin and meta.json into out_dir, each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_bin(os.path.join(out_dir, "train.bin"), train)
    write_bin(os.path.join(out_dir, "val.bin"), val)
    path = os.path.join(out_dir, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta, train_tokens=len(train), val_tokens=len(val)), f, indent=1)
    os.replace(path + ".tmp", path)


def sources(data):
    """(root, files, source) for --data; root is None for a single file."""
    if data is None:
        root, files = stdlib_files()
        return root, files, f"python {sys.version_info[0]}.{sys.version_info[1]} stdlib ({root})"
    if not os.path.exists(data):
        raise ValueError(f"--data {data!r} does not exist")
    if os.path.isdir(data):
        files = text_files(data)
        if not files:
            raise ValueError(f"--data {data!r} holds no text files")
        return data, files, os.path.abspath(data)
    if os.path.getsize(data) == 0:
        raise ValueError(f"--data {data!r} is an empty file")
    if not is_text(data):
        raise ValueError(f"--data {data!r} is not a UTF-8 text file")
    return None, [data], os.path.abspath(data)


def cached(meta_path, source, min_val):
    """Whether the cache at meta_path holds this source with a split that still serves min_val."""
    if not os.path.exists(meta_path):
        return False
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("source") != source:
        return False
    if meta.get("split", "").startswith("by file"):
        return min(meta["train_tokens"], meta["val_tokens"]) >= min_val
    return meta.get("min_val") == min_val


def prepare(data=None, seq_len=1024, cache_root=os.path.join(HERE, "data")):
    """The directory holding train.bin and val.bin for --data (None: the built-in corpus), built and
    cached on first use, with val large enough to evaluate sequences of seq_len."""
    if data is not None and os.path.isdir(data) and all(os.path.exists(os.path.join(data, f"{s}.bin"))
                                                         for s in ("train", "val")):
        return data
    root, files, source = sources(data)
    if data is None:
        out_dir = os.path.join(cache_root, "stdlib-py%d.%d" % sys.version_info[:2])
    else:
        key = hashlib.sha1(os.path.abspath(data).encode()).hexdigest()[:10]
        out_dir = os.path.join(cache_root, f"{os.path.basename(os.path.normpath(data))}-{key}")
    if cached(os.path.join(out_dir, "meta.json"), source, seq_len):
        return out_dir
    tokens, tok_s = tokenise(files, tokenizer(), f"tokenising {source}")
    if sum(len(t) for t in tokens) == len(tokens):  # nothing but the <|endoftext|> after each file
        raise ValueError(f"--data {data!r} holds no text: its files are empty")
    relpaths = [os.path.relpath(f, root) if root else os.path.basename(f) for f in files]
    train, val, how = split(relpaths, tokens, seq_len)
    print(f"data: {len(files)} files, {len(train) + len(val):,} tokens ({tok_s:,.0f} tokens/s); split {how}: "
          f"train {len(train):,} tokens, val {len(val):,}", flush=True)
    save(out_dir, dict(source=source, tokenizer="r50k_base", files=len(files), python=sys.version.split()[0],
                       split=how, min_val=seq_len), train, val)
    return out_dir


def load(data_dir, seq_len):
    """The train and val token streams as read-only uint16 memmaps, checked to hold a sequence each and
    only GPT-2 token ids (checked here, where the data enters, so that the model need not check each batch)."""
    streams = {}
    for name in ("train", "val"):
        path = os.path.join(data_dir, f"{name}.bin")
        n = os.path.getsize(path) // 2
        if n < seq_len:
            raise ValueError(f"the {name} split of {data_dir} has {n} tokens, fewer than one sequence "
                             f"(--seq_len={seq_len})")
        streams[name] = np.memmap(path, dtype=np.uint16, mode="r")
        if int(streams[name].max()) >= VOCAB:
            raise ValueError(f"{path} holds token ids past the GPT-2 vocabulary ({VOCAB}): not made by this tokenizer")
    return streams["train"], streams["val"]
