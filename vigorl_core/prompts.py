"""System prompts (task x mode), the user-text layout and the zoom observation text.

The original prompt files are paraphrased here from their structure (what each asks for: one `<think>`
block, steps grounded with (x, y), the answer as option text or a point; docs/method.md "Prompts"); the
verbatim texts are not used. One newline convention everywhere: real newlines (the original
mixed literal backslash-n in RL/eval with real newlines in SFT). Output formats are quoted
from vigorl_core.protocol's renderers, so the prompt, the SFT chains and the reward parsers agree.

Modes:
- `grounded`: ViGoRL single turn, one think block whose steps each name a point (x, y);
- `multiturn`: one think block per turn, then a `search_coordinate` zoom tool call or the answer;
- `vanilla`: R1-style think then answer, no grounding requirement (the naive-GRPO baseline);
- `answer_only`: the answer alone (base-model evaluation);
- `mcts`: the teacher prompt of tree search, ONE step or the final answer per response.
"""

from __future__ import annotations

from vigorl_core.protocol import render_single_turn, render_turn
from vigorl_core.records import TASKS

MODES: tuple[str, ...] = ("grounded", "multiturn", "vanilla", "answer_only", "mcts")

OBSERVATION_TEXT = "Here is the crop of the image centered on the coordinate"
OBSERVATION_DOT = ", with a red dot at the coordinate location"


def observation_text(draw_dot: bool) -> str:
    """Text that opens the observation user turn of a zoom. The whole turn is
    `observation_text(draw_dot) + <the crop image> + "\\n</observation>"`."""
    return "<observation>\n" + OBSERVATION_TEXT + (OBSERVATION_DOT if draw_dot else "") + ":\n"


_TASK_TEXT = {
    "spatial": (
        "You answer multiple-choice questions about the spatial layout of a scene: positions, depth, "
        "relative directions, how the view or objects move. The input is one image, or two images of the "
        "same scene shown one after the other."
    ),
    "visual_search": (
        "You answer multiple-choice questions about a high-resolution image. The object or detail the "
        "question asks about may be small, so search the image carefully before answering."
    ),
    "grounding": (
        "You locate elements on a screenshot. The user describes one element (a button, icon, link, field "
        "or text); find the point to click on it, at the centre or another representative point of the element."
    ),
    "web_action": (
        "You are an agent navigating a web browser. You receive the OBJECTIVE, a screenshot of the current "
        "page in which interactive elements are marked with numbered boxes (their ids), and your PREVIOUS "
        "ACTIONS. Choose the single next action that makes progress towards the objective.\n"
        "Action space:\n"
        "click [id]: click the element with this id.\n"
        "type [id] [content]: type content into the field with this id.\n"
        "scroll [down] or scroll [up]: scroll the page.\n"
        "go_back: return to the previous page.\n"
        "stop [answer]: finish; give the answer if the objective asks for one, otherwise stop [N/A]."
    ),
}

_ANSWER_RULE = {
    "spatial": "The answer is the exact text of the chosen option, without its letter: write "
               "<answer> right </answer>, not <answer> A. right </answer>.",
    "visual_search": "The answer is the exact text of the chosen option, without its letter: write "
                     "<answer> red </answer>, not <answer> B. red </answer>.",
    "grounding": "The answer is one point (x, y) in integer pixels of the image: <answer> (x, y) </answer>.",
    "web_action": "The answer is exactly one action from the action space, e.g. <answer> click [12] </answer>.",
}

# Placeholder written inside format templates: the shape of an answer for each task.
_ANSWER_SHAPE = {
    "spatial": "[option text]",
    "visual_search": "[option text]",
    "grounding": "(x, y)",
    "web_action": "[action]",
}

_COORDS = (
    "Points are absolute integer pixel coordinates (x, y) of the image as you see it: x counts from the "
    "left edge, y from the top edge. Never normalise them."
)


def _grounded(task: str) -> str:
    example = render_single_turn(
        ["[step text naming a region or object] (x1, y1).", "[next step] (x2, y2).", "..."],
        _ANSWER_SHAPE[task])
    return (
        "Think step by step inside ONE <think> </think> block, then give the final answer inside "
        "<answer> </answer>. Ground every reasoning step in the image: each step says what it looks at and "
        "where, with the point written inline as (x, y), e.g. \"The wooden spoons hang on the wall at "
        "(70, 650).\" Consider more than one possibility and verify your conclusion against the image "
        "before answering.\n"
        f"{_COORDS}\n"
        f"Output format:\n{example}"
    )


def _multiturn(task: str) -> str:
    template = ('<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\n'
                "</tool_call>")
    zoom = render_turn("The small sign above the door may answer this; zoom in on it at (120, 85).",
                       tool_call=(120, 85))
    final = render_turn("[your reasoning]", answer=_ANSWER_SHAPE[task])
    return (
        "You can zoom in on a specific region of the image. Every response contains exactly one "
        "<think> </think> block followed by EITHER one tool call OR the final answer.\n"
        "To zoom in, call the search_coordinate tool with the point to look at:\n"
        f"{template}\n"
        "You then receive a crop of the image centred on that point inside <observation> </observation>. "
        "Coordinates always refer to the first, full image, never to a crop. Do not request the same or a "
        "nearly identical coordinate twice; look at different regions.\n"
        f"{_COORDS}\n"
        "Give the final answer only when you are confident.\n"
        f"Example zoom turn:\n{zoom}\n"
        f"Final turn:\n{final}"
    )


def _vanilla(task: str) -> str:
    return (
        "First think through the question step by step inside <think> </think>, then give the final "
        "answer inside <answer> </answer>.\n"
        f"Output format:\n<think> [your reasoning] </think>\n<answer> {_ANSWER_SHAPE[task]} </answer>"
    )


def _answer_only(task: str) -> str:
    return (
        "Reply with the final answer only, inside <answer> </answer>, with no other text.\n"
        f"Output format:\n<answer> {_ANSWER_SHAPE[task]} </answer>"
    )


def _mcts(task: str) -> str:
    return (
        "Solve the task one reasoning step at a time. Your previous thoughts, if any, follow the question "
        "as \"Previous thought i: ...\".\n"
        "Rules:\n"
        "- Each response is EITHER exactly one new reasoning step OR the final answer, never both.\n"
        "- A reasoning step is one <think> </think> block that names exactly one point of the image.\n"
        "- Format points as (x, y): absolute integer pixels, x from the left edge, y from the top edge.\n"
        "- Never repeat a coordinate used in a previous thought.\n"
        "- Explore diverse regions (different quadrants, objects, zones) before narrowing down.\n"
        "- The final answer goes inside <answer> </answer>."
    )


_MODE_TEXT = {"grounded": _grounded, "multiturn": _multiturn, "vanilla": _vanilla,
              "answer_only": _answer_only, "mcts": _mcts}


def system_prompt(task: str, mode: str, *, min_thoughts: int | None = None) -> str:
    """The system message for `task` in `mode`. `min_thoughts` (mcts only) appends the original's
    "- There should be at least N thoughts before providing the final answer." rule."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {list(MODES)}")
    if min_thoughts is not None and (mode != "mcts" or min_thoughts < 1):
        raise ValueError(f"min_thoughts must be a positive int and only applies to mode 'mcts' "
                         f"(got min_thoughts={min_thoughts!r}, mode={mode!r})")
    rule = ("- " if mode == "mcts" else "") + _ANSWER_RULE[task]  # mcts rules are a dash list
    text = f"{_TASK_TEXT[task]}\n\n{_MODE_TEXT[mode](task)}\n{rule}"
    if min_thoughts is not None:
        text += f"\n- There should be at least {min_thoughts} thoughts before providing the final answer."
    return text


def user_text(question: str, options: list[str] | tuple[str, ...] = ()) -> str:
    """The user's text (images are separate content parts): the question, then the options one per line
    as "A. text". Answers stay option text; the rewards strip a leading letter if the model writes one."""
    question = question.strip()
    if not options:
        return question
    if len(options) > 26:
        raise ValueError(f"at most 26 options are supported, got {len(options)}")
    lines = [f"{chr(ord('A') + i)}. {opt.strip()}" for i, opt in enumerate(options)]
    return question + "\nOptions:\n" + "\n".join(lines)

