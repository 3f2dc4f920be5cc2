"""The system + developer prompt that every SYNTH conversation is rendered with.

Design choices:
- The config holds the fields that *produce* the Harmony system and developer messages (model
  identity, reasoning effort, dates, developer instructions), not rendered text, so the official
  renderer stays the only thing that decides token layout.
- JSON, validated into a dataclass through `vpmoe.config.from_dict`: unknown keys, wrong types and
  bad values are errors that name the file and the field.
- Our default ships at `vpmoe/assets/harmony_prompt.json`; the prompt is part of the data config
  hash, so shards built with another prompt never pass as the same data.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vpmoe.config import ConfigError, config_hash, from_dict, to_dict

DEFAULT_PROMPT_PATH = Path(__file__).resolve().parent.parent / "assets" / "harmony_prompt.json"


@dataclass
class PromptConfig:
    model_identity: str
    reasoning_effort: Literal["low", "medium", "high"]
    conversation_start_date: str  # YYYY-MM-DD
    knowledge_cutoff: str  # YYYY-MM
    developer_instructions: str
    # the channels the system message declares (Harmony's default set)
    valid_channels: list[str] = field(default_factory=lambda: ["analysis", "commentary", "final"])

    def validate(self) -> None:
        if not self.model_identity.strip():
            raise ConfigError("model_identity: must not be empty")
        try:
            dt.date.fromisoformat(self.conversation_start_date)
        except ValueError:
            raise ConfigError(f"conversation_start_date: expected YYYY-MM-DD, got "
                              f"{self.conversation_start_date!r}") from None
        if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", self.knowledge_cutoff):
            raise ConfigError(f"knowledge_cutoff: expected YYYY-MM, got {self.knowledge_cutoff!r}")
        if not self.developer_instructions.strip():
            raise ConfigError("developer_instructions: must not be empty")
        for required in ("analysis", "final"):
            if required not in self.valid_channels:
                raise ConfigError(f"valid_channels: must include {required!r} (SYNTH rows use it), "
                                  f"got {self.valid_channels}")

    def hash(self) -> str:
        return config_hash(self)

    def to_dict(self) -> dict:
        return to_dict(self)

    # --- Harmony objects ---
    def system_content(self):
        import openai_harmony as h

        effort = {"low": h.ReasoningEffort.LOW, "medium": h.ReasoningEffort.MEDIUM,
                  "high": h.ReasoningEffort.HIGH}[self.reasoning_effort]
        return (h.SystemContent.new()
                .with_model_identity(self.model_identity)
                .with_reasoning_effort(effort)
                .with_conversation_start_date(self.conversation_start_date)
                .with_knowledge_cutoff(self.knowledge_cutoff)
                .with_required_channels(list(self.valid_channels)))

    def developer_content(self):
        import openai_harmony as h

        return h.DeveloperContent.new().with_instructions(self.developer_instructions)


def prompt_from_dict(data: dict, source: str = "prompt") -> PromptConfig:
    """Validate a dict into a PromptConfig; errors read `SOURCE: field: problem`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [f for f in ("model_identity", "reasoning_effort", "conversation_start_date",
                           "knowledge_cutoff", "developer_instructions") if f not in data]
    if missing:
        raise ConfigError(f"{source}: missing field {missing[0]}")
    try:
        return from_dict(PromptConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_prompt(path: str | Path | None = None) -> PromptConfig:
    """Load a prompt JSON (default: our shipped `vpmoe/assets/harmony_prompt.json`)."""
    path = Path(path) if path is not None else DEFAULT_PROMPT_PATH
    if not path.is_file():
        raise ConfigError(f"{path}: prompt file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return prompt_from_dict(data, str(path))
