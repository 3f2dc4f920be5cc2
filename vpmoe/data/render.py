"""One SYNTH row -> one Harmony conversation: tokens, label-aligned loss mask and span ids.

Design choices:
- The official `openai-harmony` renderer (`render_conversation_for_training`,
  `auto_drop_analysis=False`) defines the token layout; one EOD follows every conversation.
- Masks come from the rendered token stream itself: message boundaries are the special tokens
  (`<|start|>` ... `<|message|>` content `<|end|>`/`<|return|>`), which message content can never
  produce (Harmony encodes content as ordinary text). Every token of an assistant message, from its
  `<|start|>` through its terminator, is a supervised *label*; `analysis` -> span 1, `final` ->
  span 2. Arrays are label-aligned: `loss_mask[t]`/`span_id[t]` describe predicting `tokens[t+1]`.
- Two renderers give identical tokens: `harmony` calls the official renderer per row; `fast`
  takes the structural tokens (prompt prefix, message headers, terminators) from one official
  render at start-up and encodes only the content with tiktoken (same BPE, ~6x faster than
  Harmony's encoder). It checks itself against the official renderer at start-up and, in builds,
  on every `check_every`-th row; any difference is a hard error.
- Structured truncation (training plan): keep the final message whole; cut analysis content from
  the left (its header stays), then user content from the left; if the rest still does not fit,
  the row is skipped as `final_too_long`. Cuts are at token level, so no re-encoding can move a
  message boundary.
- Bad rows raise `RowSkipped(reason, field)`; the build counts them, `--strict` and `render` turn
  them into errors naming the file, row and field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpmoe import tokenizer as tok
from vpmoe.data import DataError
from vpmoe.data.prompt import PromptConfig

TEXT_FIELDS = ("query", "synthetic_reasoning", "synthetic_answer")
ID_FIELDS = ("synth_id", "row_id")  # the first one present is the stable row id
SPANS = {"analysis": 1, "final": 2}  # span ids of assistant channels; 0 = ignore
SPAN_NAMES = {1: "reasoning", 2: "final"}
TERMINATORS = (tok.END_ID, tok.RETURN_ID, tok.CALL_ID)
SKIP_REASONS = ("missing_id", "missing_field", "empty_field", "wrong_type", "undecodable_text",
                "final_too_long")


class RowSkipped(Exception):
    """A malformed row: `reason` is one of SKIP_REASONS, `field` the column at fault."""

    def __init__(self, reason: str, field: str, detail: str = ""):
        super().__init__(f"field {field}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.field, self.detail = reason, field, detail


class RenderError(RuntimeError):
    """The renderer produced a token stream that is not valid Harmony (a bug, never bad data)."""


def id_column(columns) -> str | None:
    return next((c for c in ID_FIELDS if c in columns), None)


def check_row(row_id, query, reasoning, answer, id_field: str = "row_id") -> tuple[str, str, str, str]:
    """Validate one SYNTH row; returns (row_id, query, reasoning, answer) as str or raises RowSkipped."""
    if isinstance(row_id, (bytes, bytearray)):
        try:
            row_id = bytes(row_id).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowSkipped("undecodable_text", id_field, f"invalid UTF-8 at byte {e.start}") from None
    if row_id is None or (isinstance(row_id, str) and not row_id.strip()):
        raise RowSkipped("missing_id", id_field)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise RowSkipped("wrong_type", id_field, f"expected a string id, got {type(row_id).__name__}")
    texts = []
    for name, value in zip(TEXT_FIELDS, (query, reasoning, answer)):
        if value is None:
            raise RowSkipped("missing_field", name)
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as e:
                raise RowSkipped("undecodable_text", name, f"invalid UTF-8 at byte {e.start}") from None
        if not isinstance(value, str):
            raise RowSkipped("wrong_type", name, f"expected a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")  # lone surrogates from non-Arrow sources cannot be tokenised
        except UnicodeEncodeError as e:
            raise RowSkipped("undecodable_text", name, f"unencodable character at {e.start}") from None
        if not value.strip():
            raise RowSkipped("empty_field", name)
        texts.append(value)
    return (str(row_id), *texts)


# --- structure ---

@dataclass
class Message:
    role: str  # system / developer / user / assistant (a recipient suffix is dropped)
    channel: str | None
    start: int  # index of <|start|>
    content_start: int  # first content token (just after <|message|>)
    end: int  # index of the terminator (<|end|>, <|return|> or <|call|>); content is [content_start, end)


_header_cache: dict[tuple, str] = {}


def _header_text(ids: np.ndarray) -> str:
    key = tuple(ids.tolist())
    text = _header_cache.get(key)
    if text is None:
        text = tok.get_encoding().decode_bytes(list(key)).decode("utf-8", errors="replace").strip()
        _header_cache[key] = text
    return text


def parse_messages(tokens: np.ndarray) -> list[Message]:
    """Split a rendered conversation (optionally ending in one EOD) into messages by special tokens."""
    where = np.flatnonzero(tokens >= tok.FIRST_SPECIAL_ID)
    specials, kinds = where.tolist(), tokens[where].tolist()  # Python ints: the loop below is scalar
    messages, i, expect = [], 0, 0
    n_special = len(specials)
    while i < n_special:
        pos, kind = specials[i], kinds[i]
        if kind == tok.EOD_ID and pos == len(tokens) - 1 and pos == expect and i == n_special - 1:
            break
        if kind != tok.START_ID or pos != expect:
            raise RenderError(f"token {pos}: expected <|start|>, got id {kind}")
        role_end = specials[i + 1] if i + 1 < n_special else len(tokens)
        role = _header_text(tokens[pos + 1:role_end]).split(" ")[0]
        channel, i = None, i + 1
        while i < n_special and kinds[i] in (tok.CHANNEL_ID, tok.CONSTRAIN_ID):
            nxt = specials[i + 1] if i + 1 < n_special else len(tokens)
            if kinds[i] == tok.CHANNEL_ID:
                channel = _header_text(tokens[specials[i] + 1:nxt]).split(" ")[0]
            i += 1
        if i >= n_special or kinds[i] != tok.MESSAGE_ID:
            raise RenderError(f"message at token {pos}: header without <|message|>")
        content_start = specials[i] + 1
        i += 1
        if i >= n_special or kinds[i] not in TERMINATORS:
            raise RenderError(f"message at token {pos}: no <|end|>/<|return|>/<|call|> terminator")
        end = specials[i]
        messages.append(Message(role, channel, pos, content_start, end))
        expect, i = end + 1, i + 1
    return messages


def label_masks(n_tokens: int, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
    """Label-aligned (loss_mask, span_id), uint8 [n_tokens]: position t supervises token t+1."""
    target_span = np.zeros(n_tokens, dtype=np.uint8)
    for m in messages:
        if m.role == "assistant":
            if m.channel not in SPANS:
                raise RenderError(f"assistant message at token {m.start}: channel {m.channel!r} "
                                  f"has no span id (known: {sorted(SPANS)})")
            target_span[m.start:m.end + 1] = SPANS[m.channel]
    span_id = np.zeros(n_tokens, dtype=np.uint8)
    span_id[:-1] = target_span[1:]
    return (span_id > 0).astype(np.uint8), span_id


SYNTH_LAYOUT = [("system", None), ("developer", None), ("user", None), ("assistant", "analysis"),
                ("assistant", "final")]


def synth_messages(tokens: np.ndarray) -> list[Message]:
    """Parse and check the SYNTH layout: system, developer, user, analysis, final<|return|>, EOD."""
    messages = parse_messages(tokens)
    layout = [(m.role, m.channel if m.role == "assistant" else None) for m in messages]
    if layout != SYNTH_LAYOUT:
        raise RenderError(f"unexpected message layout {layout}, want {SYNTH_LAYOUT}")
    if tokens[messages[-1].end] != tok.RETURN_ID or messages[-1].end != len(tokens) - 2 \
            or tokens[-1] != tok.EOD_ID:
        raise RenderError("conversation must end with <|return|> then one EOD")
    return messages


# --- renderers ---

class HarmonyRenderer:
    """The official renderer: one `render_conversation_for_training` call per row, plus EOD."""

    name = "harmony"

    def __init__(self, prompt: PromptConfig):
        import openai_harmony as h

        self._h = h
        self.encoding = tok.load_harmony_encoding()
        self.system = h.Message.from_role_and_content(h.Role.SYSTEM, prompt.system_content())
        self.developer = h.Message.from_role_and_content(h.Role.DEVELOPER, prompt.developer_content())
        self.config = h.RenderConversationConfig(auto_drop_analysis=False)

    def render(self, query: str, reasoning: str, answer: str) -> np.ndarray:
        h = self._h
        conversation = h.Conversation.from_messages([
            self.system, self.developer,
            h.Message.from_role_and_content(h.Role.USER, query),
            h.Message.from_role_and_content(h.Role.ASSISTANT, reasoning).with_channel("analysis"),
            h.Message.from_role_and_content(h.Role.ASSISTANT, answer).with_channel("final"),
        ])
        ids = self.encoding.render_conversation_for_training(conversation, self.config)
        ids.append(tok.EOD_ID)
        return np.asarray(ids, dtype=np.int32)


# content that exercises the template assumption: special-token text, edge whitespace, scripts
_PROBE = (" <|end|>\n Wie geht's? 你好\n\n", "\n\n**plan** <|start|>assistant 123456 ",
          "  Réponse: 42 <|return|>\n")


class FastRenderer:
    """Structural tokens from one official render + tiktoken for content (identical output)."""

    name = "fast"

    def __init__(self, prompt: PromptConfig, check_every: int = 0):
        self.official = HarmonyRenderer(prompt)
        self.check_every, self._calls = check_every, 0
        self._encoding = tok.get_encoding()
        probe = self.official.render("", "", "")
        user, analysis, final = synth_messages(probe)[2:]
        self.head = probe[:user.content_start]  # system + developer + user header
        self.mid1 = probe[user.end:analysis.content_start]  # <|end|> + analysis header
        self.mid2 = probe[analysis.end:final.content_start]  # <|end|> + final header
        self.tail = probe[final.end:]  # <|return|> + EOD
        self.check(*_PROBE)

    def _encode(self, text: str) -> np.ndarray:
        # = encode_ordinary (no special token is recognised), but straight into a numpy buffer
        return self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def render(self, query: str, reasoning: str, answer: str) -> np.ndarray:
        enc = self._encode
        ids = np.concatenate([self.head, enc(query), self.mid1, enc(reasoning), self.mid2, enc(answer),
                              self.tail], dtype=np.int32, casting="unsafe")  # uint32 ids < 2^31
        self._calls += 1
        if self.check_every and self._calls % self.check_every == 0:
            self.check(query, reasoning, answer, ids)
        return ids

    def check(self, query: str, reasoning: str, answer: str, ids: np.ndarray | None = None) -> None:
        if ids is None:
            ids = self.render(query, reasoning, answer)
        reference = self.official.render(query, reasoning, answer)
        if not np.array_equal(ids, reference):
            where = int(np.argmax(ids[:len(reference)] != reference[:len(ids)])) if len(ids) else 0
            raise RenderError(f"fast renderer differs from openai-harmony at token {where} "
                              f"(lengths {len(ids)} vs {len(reference)}); use --renderer harmony")


def make_renderer(prompt: PromptConfig, kind: str = "fast", check_every: int = 0):
    if kind == "harmony":
        return HarmonyRenderer(prompt)
    if kind == "fast":
        return FastRenderer(prompt, check_every)
    raise DataError(f"unknown renderer {kind!r} (harmony or fast)")


# --- one document ---

@dataclass
class Document:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n], label-aligned
    span_id: np.ndarray  # uint8 [n], label-aligned
    truncated: str  # "" (whole), "analysis", or "analysis+user"


def truncate(tokens: np.ndarray, messages: list[Message], seq_len: int) -> tuple[np.ndarray, str]:
    """Structured truncation to `seq_len` tokens; raises RowSkipped('final_too_long')."""
    excess = len(tokens) - seq_len
    if excess <= 0:
        return tokens, ""
    cut_ranges, parts = [], []
    for message, label in ((messages[3], "analysis"), (messages[2], "user")):
        cut = min(excess, message.end - message.content_start)
        if cut > 0:
            cut_ranges.append(np.arange(message.content_start, message.content_start + cut))
            parts.append(label)
            excess -= cut
        if excess == 0:
            break
    if excess > 0:
        fixed = seq_len + excess
        raise RowSkipped("final_too_long", "synthetic_answer",
                         f"prompt, headers and final answer need {fixed} tokens > seq_len {seq_len}")
    return np.delete(tokens, np.concatenate(cut_ranges)), "+".join(parts)


def make_document(tokens: np.ndarray, seq_len: int | None = None) -> Document:
    """Rendered tokens -> (optionally truncated) Document with masks from the message structure."""
    messages = synth_messages(tokens)
    truncated = ""
    if seq_len is not None and len(tokens) > seq_len:
        tokens, truncated = truncate(tokens, messages, seq_len)
        messages = synth_messages(tokens)
    loss_mask, span_id = label_masks(len(tokens), messages)
    return Document(tokens, loss_mask, span_id, truncated)


# --- `vpmoe data render`: parquet -> parquet, one row per row, no truncation ---

def render_file(input_path: str | Path, out_path: str | Path, prompt: PromptConfig,
                renderer: str = "harmony", batch_rows: int = 1024, progress: bool = True) -> int:
    """Render every row of a SYNTH parquet into (row_id, tokens, loss_mask, span_id) list<int64>
    columns, the golden file's schema. Any malformed row is an error naming file, row and field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vpmoe.data.progress import Progress
    from vpmoe.data.sources import column_values, require_columns

    input_path, out_path = Path(input_path), Path(out_path)
    if not input_path.is_file():
        raise DataError(f"{input_path}: input parquet not found")
    if out_path.is_dir():
        raise DataError(f"{out_path}: is a directory; --out names the rendered parquet file")
    if out_path.exists() and out_path.samefile(input_path):
        raise DataError(f"{out_path}: is the input file; rendering would replace the SYNTH rows with tokens")
    try:
        source = pq.ParquetFile(input_path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{input_path}: not a readable parquet file: {e}") from None
    id_field = require_columns(input_path, source.schema_arrow.names)
    render = make_renderer(prompt, renderer).render
    schema = pa.schema([("row_id", pa.string()), ("tokens", pa.list_(pa.int64())),
                        ("loss_mask", pa.list_(pa.int64())), ("span_id", pa.list_(pa.int64()))])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    row_index = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer, \
                Progress(source.metadata.num_rows, "rows", f"render {input_path.name}", progress) as bar:
            for batch in source.iter_batches(batch_size=batch_rows, columns=[id_field, *TEXT_FIELDS]):
                cols = [column_values(batch.column(i)) for i in range(4)]
                ids, docs = [], []
                for row in zip(*cols):
                    try:
                        row_id, *texts = check_row(*row, id_field=id_field)
                    except RowSkipped as e:
                        raise DataError(f"{input_path}: row {row_index}: {e}") from None
                    ids.append(row_id)
                    docs.append(make_document(render(*texts)))
                    row_index += 1
                if not docs:
                    continue
                offsets = pa.array(np.concatenate([[0], np.cumsum([len(d.tokens) for d in docs])]),
                                   type=pa.int32())
                lists = [pa.ListArray.from_arrays(offsets, pa.array(
                    np.concatenate([getattr(d, f) for d in docs]).astype(np.int64)))
                    for f in ("tokens", "loss_mask", "span_id")]
                writer.write_table(pa.Table.from_arrays([pa.array(ids, pa.string()), *lists], schema=schema))
                bar.advance(len(docs), tokens=int(offsets[-1].as_py()))
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return row_index
