"""FHIR search: parse parameter values (prefixes, precision ranges, tokens, references) into a query."""
from .params import PARAMETERS, Filter, Param, SearchQuery, parse_query
from .values import DateValue, NumberValue, Reference, Token

__all__ = ["PARAMETERS", "DateValue", "Filter", "NumberValue", "Param", "Reference", "SearchQuery", "Token",
           "parse_query"]
