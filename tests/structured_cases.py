"""JSON Schemas and regexes for the structured-output tests: the subset OpenAI's structured outputs
accept (objects, arrays, enums, const, anyOf, $defs/$ref, string patterns and formats, number
ranges, required/optional) plus what llguidance adds (lengths, item counts).

Every string, array and object here is bounded (maxLength, maxItems, additionalProperties false,
as OpenAI's strict mode asks), so that a random-weight model's output ends within a tiny model's
256-token context: a free key or string would be valid at any length. Free-form JSON objects are
tested on the real model."""

NAME = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"name": NAME}, "required": ["name"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["age"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}},
        "required": ["x"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "v": {"type": "integer"}},
        "required": ["kind", "v"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 5},
    {"type": "array", "items": NAME, "maxItems": 3},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": NAME, "email": {"type": "string", "format": "email", "maxLength": 30}},
                "required": ["name", "email"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": NAME, "c": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 8}]},
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "null"}, {"type": "number"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    {"type": "string", "minLength": 3, "maxLength": 12},
    {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "null"},
    {"enum": [1, "two", None, True]},
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "maxItems": 3,
                "items": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -9, "maximum": 9}},
            }
        },
        "required": ["matrix"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"status": {"enum": ["ok", "error"]}, "message": NAME},
        "required": ["status"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"p": {"type": "integer", "minimum": 0, "maximum": 9}, "q": {"enum": ["x", "y"]}, "r": NAME},
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 16},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "sci-fi"]}, "maxItems": 3},
        },
        "required": ["title", "year", "genres"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "answer": {
                "oneOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "string", "enum": ["unknown"]}]
            }
        },
        "required": ["answer"],
        "additionalProperties": False,
    },
]
assert len(SCHEMAS) == 30

REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"#[0-9a-f]{6}",
    r"(true|false), [A-Z][a-z]{0,10}",
]
