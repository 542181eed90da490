"""MCTS tree records: the JSONL schema of `vigorl mcts` output (a superset of the original's rollouts_*.jsonl
lines) and its readers. vigorl_core.search.mcts writes these records; vigorl_core.search.linearize turns them into
chains.

    from vigorl_core.search.trees import iter_trees
    for record in iter_trees("runs/mcts/tiny/trees.jsonl"):      # ours; original files: task="spatial", ...
        print(record.id, record.status, sum(1 for _ in record.nodes()))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vigorl_core.data import DataError, read_jsonl
from vigorl_core.records import Record, Task


class TreeRollout(BaseModel):
    """One rollout, with the original's fields. `ephemeral_texts` = [question, responses on the path from
    the root, responses the rollout generated]; its last response gave `final_answer`."""

    model_config = ConfigDict(extra="forbid")
    final_answer: str | None = None
    reward: float = 0.0
    ephemeral_texts: list[str] = Field(default_factory=list)
    ephemeral_depth: int = Field(0, description="thoughts + answer at the end of the rollout")
    depth: int = Field(0, description="depth of the tree node the rollout started from (root = 0)")
    num_same_points: int = Field(0, description="rollout points already used on the path or earlier in it")
    num_different_points: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict, description="unknown keys of an original tree")


class TreeNode(BaseModel):
    """A tree node: the original's fields, then ours (optional, so original trees validate)."""

    model_config = ConfigDict(extra="forbid")
    thought_text: str = Field(description="root: the question; step: the response; terminal: the answer")
    is_terminal: bool = False
    value: float = Field(0.0, description="mean reward of the rollouts backed up through this node")
    visit_count: int = 0
    rollouts: list[TreeRollout] = Field(default_factory=list)
    children: list[TreeNode] = Field(default_factory=list)
    used_coords: list[str] = Field(default_factory=list, description="'(x, y)' points of the path so far")
    text: str | None = Field(None, description="the raw teacher response (tags present)")
    answer: str | None = None
    reward: float | None = Field(None, description="judged reward of a terminal node")
    depth: int | None = None
    points: list[tuple[int, int]] = Field(default_factory=list, description="points the response names (model frame)")
    forced: bool = Field(False, description="generated under the forced-final prompt")
    finish_reason: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class TreeRecord(Record):
    """One sample's search: a superset of the original's JSONL line {id, question, image, true_answer,
    tree, system_prompt, global_search_time}; `TreeRecord.from_original(obj, task)` reads those."""

    id: str
    question: str = Field(description="question text without options (the original's: as it was stored)")
    image: str = Field("", description="images[0] (the original's single image path)")
    true_answer: str
    tree: TreeNode
    system_prompt: str = ""
    global_search_time: float = Field(0.0, description="seconds the search took")
    task: Task
    source: str = "unknown"
    images: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)
    original_size: tuple[int, int] | None = Field(None, description="(width, height) of images[0] as given")
    model_size: tuple[int, int] | None = Field(None, description="(width, height) of the teacher's model frame of "
                                               "images[0], the frame of every point; None: the original frame")
    teacher: str | None = None
    status: Literal["ok", "timeout", "error"] = "ok"
    error: str | None = None
    stats: dict[str, float] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    def nodes(self) -> Iterator[TreeNode]:
        """Every node, pre-order."""
        stack = [self.tree]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    @classmethod
    def from_original(cls, obj: dict, task: str, source: str = "unknown") -> TreeRecord:
        """Read a line of the original's rollouts_*.jsonl (or errors_*.jsonl: status 'error', empty tree).
        Keys our schema does not know move into the nodes' and rollouts' `metadata`."""
        question = str(obj.get("question", ""))
        tree = _adapt_node(obj["tree"]) if "tree" in obj else TreeNode(thought_text=question)
        error = obj.get("error")
        return cls(id=str(obj["id"]), question=question, image=str(obj.get("image", "")),
                   true_answer=str(obj.get("true_answer", "")), tree=tree,
                   system_prompt=str(obj.get("system_prompt", "")),
                   global_search_time=float(obj.get("global_search_time", 0.0)), task=task, source=source,
                   images=[str(obj["image"])] if obj.get("image") else [],
                   status="error" if error else "ok", error=str(error) if error else None)


def _adapt(obj: dict, model: type[BaseModel]) -> dict:
    known = {k: v for k, v in obj.items() if k in model.model_fields}
    extra = {k: v for k, v in obj.items() if k not in model.model_fields}
    if extra:
        known["metadata"] = {**known.get("metadata", {}), **extra}
    return known


def _adapt_node(obj: dict) -> TreeNode:
    fields = _adapt(obj, TreeNode)
    fields["children"] = [_adapt_node(c) for c in obj.get("children", [])]
    fields["rollouts"] = [TreeRollout(**_adapt(r, TreeRollout)) for r in obj.get("rollouts", [])]
    return TreeNode(**fields)


def load_trees(path, task: str | None = None, source: str = "unknown") -> list[TreeRecord]:
    """Tree JSONL, ours or the original's (then `task` is required); bad lines raise DataError."""
    return list(iter_trees(path, task, source))


def iter_trees(path, task: str | None = None, source: str = "unknown") -> Iterator[TreeRecord]:
    """`load_trees` one record at a time (a big run's trees need not fit in memory at once)."""
    for line, obj in read_jsonl(path):
        try:
            if "schema_version" in obj:
                record = TreeRecord.model_validate(obj)
            elif task is None:
                raise ValueError("an original MCTS line: pass task= (spatial, visual_search, grounding, web_action)")
            else:
                record = TreeRecord.from_original(obj, task, source)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(path, line, None, f"not a tree record: {str(e)[:300]}") from None
        yield record
