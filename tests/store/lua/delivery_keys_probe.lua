-- the keys delivery_keys() builds, for tests/store/test_lua_keys.py
return cjson.encode(delivery_keys(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]))
