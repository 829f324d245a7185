"""The two Lua filters the gateway runs, and the scripts they carry.

Plain KServe v2 gRPC clients send no routing header: they name the model only inside the
request message (field 1, `model_name`), as ModelMesh reads it. Both scripts read that field
in Envoy (no Python on the data path) and only touch requests that need it.

- `model_header_filter` (the matcher layout's gRPC listener): a ModelInfer request with neither
  routing header gets `mm-vmodel-id` from its message, and the route is chosen again with it; a
  ModelStreamInfer stream gets it from its first request, which Envoy's gRPC field extraction
  filter read into dynamic metadata (grpc_fields.py): body() would wait for the whole stream.
  A server reflection call loses its model headers, so it goes to the activator.
- `scope_key_filter` (the scoped layout's listeners): every request gets one routing key, the
  header `x-ms-model`, from `mm-model-id`, `mm-vmodel-id`, the REST path `/v2/models/<name>`,
  the OpenAI body's `model` (lifted into metadata by openai.py's filter), field 1 of a gRPC
  Model* request body, or a stream's first request's model (grpc_fields.py); anything else
  gets "-", as does a server reflection call whatever its headers. Envoy picks the scope
  again once it is set.
- `openai_key_filter` (the matcher layout's REST listener, /v1/ paths only): the body's `model`
  into `x-ms-model`, which the route table's /v1/ branch looks up.
"""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from envoy.config.core.v3 import base_pb2
from envoy.config.core.v3 import extension_pb2 as ext_core
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from meshserve_xds import openai
from meshserve_xds.openai import J2M_NAMESPACE
from meshserve_xds.pb import pack_any
from meshserve_xds.resources import GRPC_PREFIX, KEY_HEADER, MODEL_ID_HEADER, NO_MODEL, REFLECTION_PREFIX, VMODEL_ID_HEADER

# Field 1 (model_name / name, wire type 2) of the first message in a gRPC request body, or nil:
# a gRPC frame is a 1-byte "compressed" flag and a 4-byte length, then the message; protobuf
# writers put fields in number order, so field 1 comes first (tag 0x0a).
FIELD1 = """
local function field1(b)
  if #b < 7 or string.byte(b, 1) ~= 0 or string.byte(b, 6) ~= 10 then return nil end
  local len, mult, i = 0, 1, 7
  while true do
    local c = string.byte(b, i)
    if c == nil or mult > 2^28 then return nil end
    len = len + (c % 128) * mult
    i = i + 1
    if c < 128 then break end
    mult = mult * 128
  end
  if len == 0 or i + len - 1 > #b then return nil end
  return string.sub(b, i, i + len - 1)
end"""

MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
# Where Envoy's gRPC field extraction filter puts a stream's first request's model_name (grpc_fields.py).
FIELDS_NAMESPACE = "envoy.filters.http.grpc_field_extraction"
# How far into the message to look: the gRPC frame prefix (5), field 1's tag (1), its length
# varint (up to 5) and a model name of up to 1 KiB.
SCAN = 5 + 1 + 5 + 1024

MODEL_HEADER_LUA = f"""
local PATH = "{MODEL_INFER_PATH}"
local STREAM = "{MODEL_STREAM_INFER_PATH}"
local REFLECTION = "{REFLECTION_PREFIX}"

{FIELD1}
function envoy_on_request(h)
  local hs = h:headers()
  local path = hs:get(":path") or ""
  if string.sub(path, 1, #REFLECTION) == REFLECTION then
    -- Reflection is the gateway's, not a model's: without its model headers the fallback
    -- route takes it to the activator.
    hs:remove("{MODEL_ID_HEADER}")
    hs:remove("{VMODEL_ID_HEADER}")
    return
  end
  if hs:get("{MODEL_ID_HEADER}") ~= nil or hs:get("{VMODEL_ID_HEADER}") ~= nil then return end
  if path == STREAM then
    local md = h:streamInfo():dynamicMetadata():get("{FIELDS_NAMESPACE}")
    local name = md ~= nil and type(md["model_name"]) == "table" and md["model_name"][1]
    if name and name ~= "" then hs:add("{VMODEL_ID_HEADER}", name) end
    return
  end
  if path ~= PATH then return end
  local body = h:body()
  if body == nil then return end
  local n = body:length()
  local name = field1(body:getBytes(0, math.min(n, {SCAN})))
  if name ~= nil then
    -- The headers handle taken before body() is stale once it returns: take it again.
    -- Modifying request headers clears the route cache: the route is matched again on it.
    h:headers():add("{VMODEL_ID_HEADER}", name)
  end
end
"""

SCOPE_KEY_LUA = f"""
local GRPC = "{GRPC_PREFIX}"
local STREAM = "{MODEL_STREAM_INFER_PATH}"
local REFLECTION = "{REFLECTION_PREFIX}"

{FIELD1}
function envoy_on_request(h)
  local hs = h:headers()
  if hs:get("{KEY_HEADER}") ~= nil then hs:remove("{KEY_HEADER}") end
  local path = hs:get(":path") or ""
  -- Reflection is the gateway's, whatever model header came with it (grpcurl's -H does).
  if string.sub(path, 1, #REFLECTION) == REFLECTION then
    hs:add("{KEY_HEADER}", "{NO_MODEL}")
    return
  end
  -- The REST path wins: a scope then pins segment 3 exactly, so one prefix route per name is
  -- enough (no "/v2/models/m1" matching "/v2/models/m10").
  local name = string.match(path, "^/v2/models/([^/?]+)")
  -- OpenAI-style requests name the model in the JSON body: json_to_metadata (before this
  -- filter, on /v1/ paths only) lifted it into dynamic metadata.
  if name == nil and string.sub(path, 1, 4) == "/v1/" then
    local md = h:streamInfo():dynamicMetadata():get("{J2M_NAMESPACE}")
    if md ~= nil and type(md["model"]) == "string" and md["model"] ~= "" then name = md["model"] end
  end
  if name == nil then name = hs:get("{MODEL_ID_HEADER}") or hs:get("{VMODEL_ID_HEADER}") end
  -- A stream's model is its first request's, which the field extraction filter before this one
  -- read (body() would wait for the whole stream).
  if name == nil and path == STREAM then
    local md = h:streamInfo():dynamicMetadata():get("{FIELDS_NAMESPACE}")
    local first = md ~= nil and type(md["model_name"]) == "table" and md["model_name"][1]
    if first and first ~= "" then
      name = first
      hs:add("{VMODEL_ID_HEADER}", name)
    end
  elseif name == nil and string.sub(path, 1, #GRPC + 5) == GRPC .. "Model" then
    local body = h:body()
    if body ~= nil then
      name = field1(body:getBytes(0, math.min(body:length(), {SCAN})))
      if name ~= nil then h:headers():add("{VMODEL_ID_HEADER}", name) end
    end
    hs = h:headers()  -- the handle taken before body() is stale once it returns
  end
  -- Setting the key clears the route cache: Envoy picks the scope again with it.
  hs:add("{KEY_HEADER}", name or "{NO_MODEL}")
end
"""


OPENAI_KEY_LUA = f"""
function envoy_on_request(h)
  local hs = h:headers()
  -- Only what the body says routes: a client's own header is dropped.
  if hs:get("{KEY_HEADER}") ~= nil then hs:remove("{KEY_HEADER}") end
  local md = h:streamInfo():dynamicMetadata():get("{J2M_NAMESPACE}")
  if md ~= nil and type(md["model"]) == "string" and md["model"] ~= "" then hs:add("{KEY_HEADER}", md["model"]) end
end
"""


def lua_config(script: str) -> lua_pb2.Lua:
    return lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=script), clear_route_cache=wrappers_pb2.BoolValue(value=True))


def lua_filter(script: str) -> hcm.HttpFilter:
    """A Lua filter running `script`; a header it sets clears the route cache, so the route (or
    scope) is chosen again with it."""
    return hcm.HttpFilter(name="envoy.filters.http.lua", typed_config=pack_any(lua_config(script)))


def model_header_filter() -> hcm.HttpFilter:
    return lua_filter(MODEL_HEADER_LUA)


def scope_key_filter() -> hcm.HttpFilter:
    return lua_filter(SCOPE_KEY_LUA)


def openai_key_filter() -> hcm.HttpFilter:
    """The matcher layout's: runs after json_to_metadata, on /v1/ paths only (openai.only_on_v1)."""
    return openai.only_on_v1(ext_core.TypedExtensionConfig(name="envoy.filters.http.lua", typed_config=pack_any(lua_config(OPENAI_KEY_LUA))),
                             "meshserve.openai_key")
