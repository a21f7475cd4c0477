"""The engine room: owns the device. Scheduler, per-stream states, batched eventful steps, budgets, stats."""

from server.engine.budget import BudgetError, BudgetPolicy, GlobalBudget, ResolvedBudget, StreamOverride
from server.engine.engine import Engine, EngineConfig, EngineNotReady, StreamHandle, StreamInfo
from server.engine.messages import FrameDropped, FrameError, FrameResult, FrameTiming, StreamMessage
from server.engine.queries import QueriesUnsupported, QueryError
from server.engine.registry import StreamRefused
from server.engine.runner import ModelRunner, Runner

__all__ = [
    "BudgetError", "BudgetPolicy", "Engine", "EngineConfig", "EngineNotReady", "FrameDropped", "FrameError",
    "FrameResult", "FrameTiming", "GlobalBudget", "ModelRunner", "QueriesUnsupported", "QueryError", "ResolvedBudget",
    "Runner", "StreamHandle", "StreamInfo", "StreamMessage", "StreamOverride", "StreamRefused",
]
