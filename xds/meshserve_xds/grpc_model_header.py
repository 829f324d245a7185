"""Plain KServe v2 gRPC clients send no routing header: they name the model only inside the
ModelInferRequest message (field 1, `model_name`), as ModelMesh reads it.

A small Lua filter on the gRPC listener reads that field and sets `mm-vmodel-id`, then the
route is chosen again with the header in place. It runs in Envoy (no Python on the data path)
and only touches requests that carry neither routing header: those that do pay one header
lookup.
"""

from __future__ import annotations

from google.protobuf import any_pb2, wrappers_pb2

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
# How far into the message to look: the gRPC frame prefix (5), field 1's tag (1), its length
# varint (up to 5) and a model name of up to 1 KiB.
_SCAN = 5 + 1 + 5 + 1024

LUA = f"""
local PATH = "{MODEL_INFER_PATH}"

-- Field 1 (model_name, wire type 2) of the first message in a gRPC request body, or nil.
local function model_name(b)
  -- gRPC frame: 1 byte "compressed" flag, 4 bytes length, then the protobuf message.
  if #b < 7 or string.byte(b, 1) ~= 0 then return nil end
  -- protobuf writers put fields in number order, so field 1 comes first: tag 0x0a.
  if string.byte(b, 6) ~= 10 then return nil end
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
end

function envoy_on_request(h)
  local hs = h:headers()
  if hs:get("mm-model-id") ~= nil or hs:get("mm-vmodel-id") ~= nil then return end
  if hs:get(":path") ~= PATH then return end
  local body = h:body()
  if body == nil then return end
  local n = body:length()
  local name = model_name(body:getBytes(0, math.min(n, {_SCAN})))
  if name ~= nil then
    -- The headers handle taken before body() is stale once it returns: take it again.
    -- Modifying request headers clears the route cache: the route is matched again on it.
    h:headers():add("mm-vmodel-id", name)
  end
end
"""


def lua_filter() -> hcm.HttpFilter:
    cfg = lua_pb2.Lua(
        default_source_code=base_pb2.DataSource(inline_string=LUA),
        clear_route_cache=wrappers_pb2.BoolValue(value=True),
    )
    a = any_pb2.Any()
    a.Pack(cfg)
    return hcm.HttpFilter(name="envoy.filters.http.lua", typed_config=a)
