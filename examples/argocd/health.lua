-- Argo CD health check for fedrun.io/FederatedRun, installed in argocd-cm as
-- resource.customizations.health.fedrun.io_FederatedRun (see docs/gitops.md).
--   Succeeded                -> Healthy
--   Failed, BudgetExhausted  -> Degraded
--   Suspended                -> Suspended
--   anything else            -> Progressing, "round n/N, ε x/y" (Pending, Running, no status yet)
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

-- A non-negative number with at most three decimals (0.996, 0.5, 1), built digit by digit
-- from whole numbers: Argo CD's Lua prints other floats with every digit
-- (0.30000000000000004). Three, not two: ε 0.996 of 1 must not read as "1/1".
local function decimal(value)
  local thousandths = value * 1000 + 0.5
  thousandths = thousandths - thousandths % 1
  local fraction = thousandths % 1000
  local text = tostring((thousandths - fraction) / 1000)
  if fraction == 0 then
    return text
  end
  text = text .. "."
  local place = 100
  while fraction > 0 do
    local digit = (fraction - fraction % place) / place
    text = text .. digit
    fraction = fraction - digit * place
    place = place / 10
  end
  return text
end

local function orUnknown(value)
  if value == nil then
    return "?"
  end
  return decimal(value)
end

local spec = tbl(obj.spec)
local status = tbl(obj.status)
local round = tbl(status.round)
local privacy = tbl(status.privacy)
local specPrivacy = tbl(spec.privacy)

-- status.round.total is 0 until the operator has written it: fall back to spec.rounds.
local total = num(round.total)
if total == nil or total == 0 then
  total = num(spec.rounds)
end
local progress = "round " .. decimal(num(round.current) or 0) .. "/" .. orUnknown(total)
if specPrivacy.enabled == false then
  progress = progress .. ", no DP"
else
  progress = progress .. ", ε " .. decimal(num(privacy.epsilonSpent) or 0) .. "/"
    .. orUnknown(num(privacy.targetEpsilon) or num(specPrivacy.targetEpsilon))
end

local detail = ""
if type(status.message) == "string" and status.message ~= "" then
  detail = ": " .. status.message
end

local hs = {}
local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded, " .. progress
  local auroc = num(tbl(status.metrics).auroc)
  if auroc ~= nil then
    hs.message = hs.message .. ", AUROC " .. decimal(auroc)
  end
elseif phase == "Failed" or phase == "BudgetExhausted" then
  hs.status = "Degraded"
  hs.message = phase .. ", " .. progress .. detail
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended, " .. progress .. detail
else
  hs.status = "Progressing"
  hs.message = progress
end
return hs
