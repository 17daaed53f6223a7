-- Times the pattern functions: run it with `lua5.4 bench/scripts/patterns.lua`
-- (Lua's own C matcher) and as a KVdb script (KVdb's port, under its limits;
-- give it `--script-time-ms 5000`). Best of 5 rounds of each.
local out = kvdb and kvdb.say or print
local s = ("hello world  "):rep(80000)
local best = {math.huge, math.huge, math.huge, math.huge}
for round = 1, 5 do
  local t0 = os.clock()
  local r, n = s:gsub("%s+", " ")
  local t1 = os.clock()
  local c = 0 for w in s:gmatch("%a+") do c = c + 1 end
  local t2 = os.clock()
  local k = 0 for i = 1, 100000 do if ("key:123:name"):find("^key:(%d+):") then k = k + 1 end end
  local t3 = os.clock()
  local m = 0 for i = 1, 100000 do if ("a,b;c"):match("([^,]+),") then m = m + 1 end end
  local t4 = os.clock()
  local t = {t1 - t0, t2 - t1, t3 - t2, t4 - t3}
  for i = 1, 4 do if t[i] < best[i] then best[i] = t[i] end end
end
out(string.format("gsub 1 MB %.1f ms, gmatch 160k words %.1f ms, find x100k %.1f ms, match x100k %.1f ms",
  best[1] * 1000, best[2] * 1000, best[3] * 1000, best[4] * 1000))
