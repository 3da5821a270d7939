"""A conversation whose history lives with the requester: the service is stateless, so every
turn sends the whole conversation so far."""

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Unpack

from pydantic import BaseModel

from chatbus.client import ChatClient, ChatEvent, RequestFields
from chatbus.contract import ChatMessage, DoneReply


class ConversationState(BaseModel):
    """What `Conversation.export` gives and `Conversation.restore` takes."""

    system: str | None = None
    model: str | None = None
    messages: list[ChatMessage] = []


class Conversation:
    """```
    conversation = Conversation(client, system="Answer in one sentence.")
    await conversation.say("Why is the sky blue?")
    await conversation.say("And at sunset?")  # sent with the first question and answer
    ```

    `say` and `stream` add the question and the answer to `messages` once the answer is
    done; a turn that fails or is cancelled leaves the history as it was. `fields` (model,
    options, think, tools, ...) go with every turn; `model` may be changed between turns.
    """

    def __init__(
        self,
        client: ChatClient,
        *,
        system: str | None = None,
        messages: Sequence[ChatMessage] = (),
        **fields: Unpack[RequestFields],
    ) -> None:
        self.client = client
        self.system = system
        self.messages = list(messages)
        self.fields = fields

    @property
    def model(self) -> str | None:
        return self.fields.get("model")

    @model.setter
    def model(self, model: str | None) -> None:
        self.fields["model"] = model

    async def say(self, content: str, *, timeout: float | None = None) -> DoneReply:
        """Ask, wait for the whole answer, and add both turns to the history."""
        question = ChatMessage(role="user", content=content)
        done = await self.client.chat(self._with(question), timeout=timeout, **self.fields)
        self._add(question, done)
        return done

    async def stream(
        self, content: str, *, timeout: float | None = None
    ) -> AsyncGenerator[ChatEvent, None]:
        """Ask and stream the answer as `ChatClient.stream` does; both turns are added to
        the history when the `DoneReply` arrives."""
        question = ChatMessage(role="user", content=content)
        events = self.client.stream(self._with(question), timeout=timeout, **self.fields)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, DoneReply):
                    self._add(question, event)
                yield event

    def reset(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.messages.clear()

    def export(self) -> dict[str, Any]:
        """The history as plain JSON data: the system prompt, the model and the messages."""
        state = ConversationState(system=self.system, model=self.model, messages=self.messages)
        return state.model_dump(mode="json", exclude_none=True)

    @classmethod
    def restore(
        cls, client: ChatClient, exported: dict[str, Any], **fields: Unpack[RequestFields]
    ) -> "Conversation":
        """A conversation that goes on from what `export` gave."""
        state = ConversationState.model_validate(exported)
        fields.setdefault("model", state.model)
        return cls(client, system=state.system, messages=state.messages, **fields)

    def _with(self, question: ChatMessage) -> list[ChatMessage]:
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        return [*system, *self.messages, question]

    def _add(self, question: ChatMessage, done: DoneReply) -> None:
        answer = ChatMessage.model_validate(done.message.model_dump(exclude_none=True))
        self.messages += [question, answer]
