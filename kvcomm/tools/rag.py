"""A RAG pipeline over the standard library's docstrings: retrieve → expert → critic → final.

The corpus is the docstrings of standard-library functions and classes (read with
:mod:`inspect`, so it ships with every Python), cut into passages of exactly ``size`` tokens of
the model's tokenizer, as RAG systems chunk their documents. BM25 picks two passages per
question, which fill the slots ``doc:1`` and ``doc:2``. A question counts as answered (a *hit*)
when the final answer names the function the question is about.

``examples/rag_pipeline.py`` runs this pipeline per policy; ``kvcomm eval --workload rag`` runs it
free (a task-level figure) and teacher-forced (fidelity figures on these agents).

Why fixed-size chunks: kvcomm can stand a new passage in for anchors at least as long as it
(the deviation of position t is only known where the anchor has a token t). Passages of one
length make every earlier passage a candidate anchor; passages of random lengths would keep
turning the longest one seen so far into a new anchor, and that call into a full prefill.
"""

from __future__ import annotations

import importlib
import inspect
import math
import operator
import re
from collections import Counter
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

from kvcomm.agents import share_context
from kvcomm.engine import Result
from kvcomm.template import Template

MODULES = ["json", "os.path", "re", "collections", "itertools", "functools", "string", "textwrap", "math",
           "statistics", "random", "shutil", "csv", "heapq", "bisect", "glob", "base64", "hashlib", "zlib"]
CHUNK_TOKENS = 48  # the passage length in tokens (the example's --chunk-tokens default)
QUESTIONS = [  # (question, the function the answer should name); the example's first 20 come first
    ("How do I turn a JSON string into a Python object?", "loads"),
    ("How can I join two parts of a file path?", "join"),
    ("Which function finds all matches of a regular expression in a string?", "findall"),
    ("How do I count how often each item occurs in a list?", "Counter"),
    ("How can I chain several iterables into one?", "chain"),
    ("How do I cache the results of an expensive function?", "lru_cache"),
    ("How can I wrap a long paragraph to a fixed line width?", "wrap"),
    ("How do I compute the greatest common divisor of two integers?", "gcd"),
    ("How do I compute the median of a list of numbers?", "median"),
    ("How can I pick a random element from a list?", "choice"),
    ("How do I copy a whole directory tree?", "copytree"),
    ("How do I read rows from a CSV file?", "reader"),
    ("How can I get the n smallest items of a list?", "nsmallest"),
    ("How do I insert into a sorted list and keep it sorted?", "insort"),
    ("How do I list the files that match a wildcard pattern?", "glob"),
    ("How do I encode bytes as base64?", "b64encode"),
    ("How can I compute the SHA-256 hash of some bytes?", "sha256"),
    ("How do I compress bytes with zlib?", "compress"),
    ("How can I check whether a path points to an existing file?", "isfile"),
    ("How do I split a string with a regular expression?", "split"),
    # more questions, so that a task-level figure can run n >= 40 distinct requests; answers
    # that a restated question would contain, or that are common words, are left out
    ("How do I turn a Python object into a JSON string?", "dumps"),
    ("How do I get the last component of a file path?", "basename"),
    ("How do I split a file name into its name and its extension?", "splitext"),
    ("How do I get the size of a file in bytes?", "getsize"),
    ("How do I expand a leading ~ in a path to the user's home directory?", "expanduser"),
    ("How do I check that a whole string matches a regular expression?", "fullmatch"),
    ("How do I make a dictionary that gives a default value for missing keys?", "defaultdict"),
    ("Which container supports fast appends and pops at both ends?", "deque"),
    ("How do I create a tuple subclass with named fields?", "namedtuple"),
    ("How do I get all orderings of the items of a list?", "permutations"),
    ("How do I get every pair of items from a list, ignoring order?", "combinations"),
    ("How do I group consecutive equal items of an iterable?", "groupby"),
    ("How do I compute running totals of a list?", "accumulate"),
    ("How do I take only the first n items of an iterator?", "islice"),
    ("How do I zip lists of different lengths and pad the shorter ones?", "zip_longest"),
    ("How do I combine the items of a list into one value with a two-argument function?", "reduce"),
    ("How can a class get all comparison methods from defining only __eq__ and __lt__?", "total_ordering"),
    ("How do I capitalize every word of a string?", "capwords"),
    ("How do I remove common leading whitespace from every line of a text?", "dedent"),
    ("How do I truncate a text to fit a given width with a placeholder?", "shorten"),
    ("How do I add a prefix to the start of every line of a text?", "indent"),
    ("How do I compute n! for an integer n?", "factorial"),
    ("How do I check whether two floating-point numbers are approximately equal?", "isclose"),
    ("How do I compute the Euclidean length of a vector from its coordinates?", "hypot"),
    ("How do I compute the sample standard deviation of some numbers?", "stdev"),
    ("How do I delete a directory and everything in it?", "rmtree"),
    ("How do I find out how much free space a disk has?", "disk_usage"),
    ("How do I push an item onto a heap?", "heappush"),
    ("How do I get the n largest items of a list?", "nlargest"),
    ("How do I find the position where an item would be inserted in a sorted list?", "bisect"),
    ("How do I decode a base64 string back into bytes?", "b64decode"),
    ("How do I base64-encode bytes so the result is safe in URLs?", "urlsafe_b64encode"),
    ("How do I compute a CRC-32 checksum of some bytes?", "crc32"),
    ("How do I get back the original bytes from zlib-compressed data?", "decompress"),
    ("How do I iterate lazily over the file names that match a wildcard pattern?", "iglob"),
    ("How do I get the directory part of a file path?", "dirname"),
    ("How can I check whether a path is a directory?", "isdir"),
    ("How do I keep a function's name and docstring when I write a decorator?", "wraps"),
    ("Which dictionary remembers the order keys were inserted and can move a key to the end?", "OrderedDict"),
]

EXPERT = Template.from_system_user(
    "You are a Python expert. Answer from the documentation given.",
    "Documentation:\n{doc:1}\n{doc:2}\nQuestion:\n{question}\nName the function to use and show one line of code.",
)
CRITIC = Template.from_system_user(
    "You review answers about Python for mistakes.",
    "Documentation:\n{doc:1}\nQuestion:\n{question}\nProposed answer:\n{agent:expert}\nIs it right? Say why briefly.",
)
FINAL = Template.from_system_user(
    "You write the final answer for the user.",
    "Question:\n{question}\nExpert:\n{agent:expert}\nReview:\n{agent:critic}\nGive the final answer in one sentence.",
)
AGENTS = [("expert", EXPERT), ("critic", CRITIC), ("final", FINAL)]  # in pipeline order


def documents() -> list[str]:
    """One text per documented public function or class of MODULES: its summary paragraph."""
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            out.append(f"{name}.{attr}: {' '.join(doc.split(chr(10) * 2)[0].split())}")
    return out


def chunk(text: str, tokenizer: Any, size: int) -> list[str]:
    """``text`` cut into consecutive passages that each encode to exactly ``size`` tokens.

    A window of ``size`` token ids does not always survive decode → encode unchanged (BPE may
    merge or split differently at the cut), so where it does not, the window's end moves by one
    or two tokens until the decoded text re-encodes to ``size`` tokens; the rare window that
    never does is skipped. The tail shorter than ``size`` is dropped.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out, start = [], 0
    while start + size <= len(ids):
        end = start + size
        for cut in (end, end - 1, end + 1, end - 2, end + 2):
            piece = tokenizer.decode(ids[start:cut]).strip()
            if cut <= len(ids) and len(tokenizer(piece, add_special_tokens=False).input_ids) == size:
                out.append(piece)
                end = cut
                break
        start = end
    return out


def corpus(tokenizer: Any, size: int = CHUNK_TOKENS) -> list[str]:
    """Each module's documents, one after another, cut into passages of ``size`` tokens."""
    by_module: dict[str, list[str]] = {}
    for doc in documents():
        by_module.setdefault(doc.split(".", 1)[0], []).append(doc)
    return [p for docs in by_module.values() for p in chunk("\n".join(docs), tokenizer, size)]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))


class BM25:
    """Okapi BM25 over a list of passages (k1=1.5, b=0.75)."""

    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs, self.k1, self.b = docs, k1, b
        self.tfs = [Counter(_tokens(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg = sum(self.lens) / max(1, len(docs))
        df = Counter(t for tf in self.tfs for t in tf)
        self.idf = {t: math.log(1 + (len(docs) - n + 0.5) / (n + 0.5)) for t, n in df.items()}

    def top(self, query: str, k: int) -> list[str]:
        q = _tokens(query)

        def score(i: int) -> float:
            tf, norm = self.tfs[i], self.k1 * (1 - self.b + self.b * self.lens[i] / self.avg)
            return sum(self.idf.get(t, 0.0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in q if t in tf)

        best = sorted(range(len(self.docs)), key=score, reverse=True)[:k]
        return [self.docs[i] for i in best]


class State(TypedDict, total=False):
    # kvcomm.agents.KVCommState's one field, declared here (one summary per engine call)
    kvcomm_calls: Annotated[list[dict[str, Any]], operator.add]
    question: str
    doc_1: str
    doc_2: str
    expert_answer: str
    critic_answer: str
    final_answer: str


@share_context(agent="expert", template=EXPERT)
def expert(state: State, result: Result) -> None:
    return None


@share_context(agent="critic", template=CRITIC)
def critic(state: State, result: Result) -> None:
    return None


@share_context(agent="final", template=FINAL)
def final(state: State, result: Result) -> None:
    return None


def build_graph(index: BM25) -> Any:
    """The compiled LangGraph pipeline; run it with ``graph.invoke({"question": q}, context=engine)``."""

    def retrieve(state: State) -> dict[str, str]:
        doc_1, doc_2 = index.top(state["question"], 2)
        return {"doc_1": doc_1, "doc_2": doc_2}

    g = StateGraph(State)
    g.add_node("retrieve", retrieve)
    for node in (expert, critic, final):
        g.add_node(node)
    g.add_edge(START, "retrieve")
    g.add_edge("retrieve", "expert")
    g.add_edge("expert", "critic")
    g.add_edge("critic", "final")
    g.add_edge("final", END)
    return g.compile()


def is_hit(expected: str, final_answer: str) -> bool:
    """The task metric: the final answer names the expected function (case-insensitive)."""
    return expected.lower() in final_answer.lower()


def request_fills(index: BM25, question: str) -> dict[str, str]:
    """The non-agent slots of one request, as the pipeline's retrieve step fills them."""
    doc_1, doc_2 = index.top(question, 2)
    return {"question": question, "doc:1": doc_1, "doc:2": doc_2}


__all__ = ["AGENTS", "BM25", "CHUNK_TOKENS", "CRITIC", "EXPERT", "FINAL", "MODULES", "QUESTIONS", "State",
           "build_graph", "chunk", "corpus", "critic", "documents", "expert", "final", "is_hit", "request_fills"]
