"""Structured output: llm.structured_predict(Schema, PromptTemplate), as_structured_llm. Swap: llm=MSALLM(engine).

The reply must be JSON valid against the schema; an invalid one is sent back with the error, a bounded number
of times. A random model never produces valid JSON: the call fails after exactly max_retries + 1 attempts
with an error that says what to do (a larger model), never with a half-parsed object."""

import pytest
from llama_index.core import PromptTemplate
from pydantic import BaseModel

from msa_plugins.integrations.llama_index import MSALLM, ToolCallError


class City(BaseModel):
    name: str
    country: str


def test_structured_predict_is_validated_with_bounded_retries(engine):
    llm = MSALLM(engine, max_retries=2)
    with pytest.raises(ToolCallError, match="3 attempts.*larger"):
        llm.structured_predict(City, PromptTemplate("Name the capital of {country}."), country="France")
    with pytest.raises(ToolCallError):
        llm.as_structured_llm(City).complete("Name the capital of France.")
