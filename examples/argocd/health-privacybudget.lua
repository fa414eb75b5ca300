-- Argo CD health check for fedrun.io/PrivacyBudget, installed in argocd-cm as
-- resource.customizations.health.fedrun.io_PrivacyBudget (see docs/gitops.md).
--   a condition Ready with status False      -> Degraded, its reason and message
--   not accounted yet (no status figures)    -> Progressing, "not accounted yet"
--   status.remaining <= 0 (no ε for new runs) -> Degraded, "ε spent x of L (committed c): ..."
--   otherwise                                -> Healthy, "ε spent x of L (committed c)"
-- Argo CD runs custom checks without the string and math libraries and stops them after
-- 1 s, so this uses tables, comparisons and arithmetic only.

local function tbl(value)
  if type(value) == "table" then
    return value
  end
  return {}
end

local function num(value)
  if type(value) == "number" then
    return value
  end
  return nil
end

local function text(value)
  if type(value) == "string" and value ~= "" then
    return value
  end
  return nil
end

-- A non-negative number with at most three decimals (0.996, 0.5, 1), built digit by digit
-- from whole numbers: Argo CD's Lua prints other floats with every digit
-- (0.30000000000000004). The same function as in health.lua.
local function decimal(value)
  local thousandths = value * 1000 + 0.5
  thousandths = thousandths - thousandths % 1
  local fraction = thousandths % 1000
  local out = tostring((thousandths - fraction) / 1000)
  if fraction == 0 then
    return out
  end
  out = out .. "."
  local place = 100
  while fraction > 0 do
    local digit = (fraction - fraction % place) / place
    out = out .. digit
    fraction = fraction - digit * place
    place = place / 10
  end
  return out
end

local function orUnknown(value)
  if value == nil or value < 0 then
    return "?"
  end
  return decimal(value)
end

local spec = tbl(obj.spec)
local status = tbl(obj.status)
local limit = num(spec.epsilon)
local spent = num(status.spent)
local committed = num(status.committed)
local remaining = num(status.remaining)
-- remaining is limit − committed; a status written without it still says as much.
if remaining == nil and committed ~= nil and limit ~= nil then
  remaining = limit - committed
end

-- The operator writes spent, committed and remaining together once it has accounted the
-- budget's charges (none: all 0, remaining the whole limit).
local figures = nil
if spent ~= nil and remaining ~= nil then
  figures = "ε spent " .. orUnknown(spent) .. " of " .. orUnknown(limit)
    .. " (committed " .. orUnknown(committed) .. ")"
end

local notReady = nil
for _, condition in ipairs(tbl(status.conditions)) do
  condition = tbl(condition)
  if condition.type == "Ready" and condition.status == "False" then
    notReady = "not ready"
    local reason = text(condition.reason)
    if reason ~= nil then
      notReady = notReady .. " (" .. reason .. ")"
    end
    local message = text(condition.message)
    if message ~= nil then
      notReady = notReady .. ": " .. message
    end
  end
end

local hs = {}
if notReady ~= nil then
  hs.status = "Degraded"
  hs.message = (figures or "not accounted yet") .. ": " .. notReady
elseif figures == nil then
  hs.status = "Progressing"
  hs.message = "not accounted yet"
elseif remaining <= 0 then
  hs.status = "Degraded"
  hs.message = figures .. ": nothing left for a new run"
else
  hs.status = "Healthy"
  hs.message = figures
end
return hs
