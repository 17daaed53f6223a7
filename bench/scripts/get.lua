kvdb.say(kvdb.get("k"))
