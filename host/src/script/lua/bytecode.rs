//! Reading compiled Lua 5.4 (the output of `string.dump`) to find
//! to-be-closed variables (`local x <close> = ...`), which scripts may not
//! declare.
//!
//! Why: the limits are enforced by an instruction hook, and an error raised
//! from that hook unwinds the running function's registers with Lua's hooks
//! off (mlua clears the stack from inside the hook), which runs the
//! function's pending `__close` metamethods with nothing to stop them. A
//! `__close` that loops would hold a thread forever (found by a review). The
//! compiled code is checked rather than the text, so that no spelling of the
//! attribute (comments, line breaks) can slip past.
//!
//! This module only reads bytes; it must not load or run anything.

/// `OP_TBC` in Lua 5.4's `lopcodes.h`: the instruction that marks a local
/// as to be closed. Every `<close>` local compiles to one.
const OP_TBC: u32 = 55;

/// The header `luaU_dump` writes: signature, version 5.4, format 0, the
/// conversion check bytes, the sizes of an instruction, an integer and a
/// number (4, 8, 8), then a test integer and a test number (8 bytes each).
const HEADER: &[u8] = b"\x1bLua\x54\x00\x19\x93\r\n\x1a\n\x04\x08\x08";
const HEADER_TESTS: usize = 16;

/// Whether the stripped dump of a chunk declares a to-be-closed variable in
/// any of its functions.
///
/// # Errors
/// The bytes are not a dump this module can read (another Lua version): a
/// message for the log; the caller refuses the script rather than run code
/// it could not check.
pub(super) fn declares_to_be_closed(dump: &[u8]) -> Result<bool, &'static str> {
    let mut r = Dump { bytes: dump, at: 0 };
    if r.take(HEADER.len())? != HEADER {
        return Err("not a Lua 5.4 dump with 4-byte instructions");
    }
    r.take(HEADER_TESTS)?;
    r.take(1)?; // The main function's number of upvalues.
    let found = r.function(0)?;
    if r.at != dump.len() {
        return Err("bytes after the main function");
    }
    Ok(found)
}

/// How deep functions may nest in a dump (Lua's parser allows 200 levels of
/// C calls, so real code stays far below).
const MAX_NESTING: usize = 250;

struct Dump<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Dump<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("length out of range")?;
        let taken = self.bytes.get(self.at..end).ok_or("truncated dump")?;
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    /// `dumpSize`: 7 bits a byte, most significant first, the last byte
    /// marked with 0x80.
    fn size(&mut self) -> Result<usize, &'static str> {
        let mut value: usize = 0;
        loop {
            let b = self.byte()?;
            value = value
                .checked_mul(128)
                .and_then(|v| v.checked_add(usize::from(b & 0x7f)))
                .ok_or("size out of range")?;
            if b & 0x80 != 0 {
                return Ok(value);
            }
        }
    }

    /// `dumpString`: its size plus one (0: no string), then its bytes.
    fn string(&mut self) -> Result<(), &'static str> {
        let size = self.size()?;
        if size > 0 {
            self.take(size - 1)?;
        }
        Ok(())
    }

    /// `dumpFunction`; whether it or a function inside it has an `OP_TBC`.
    fn function(&mut self, depth: usize) -> Result<bool, &'static str> {
        if depth > MAX_NESTING {
            return Err("functions nested too deep");
        }
        self.string()?; // source
        self.size()?; // linedefined
        self.size()?; // lastlinedefined
        self.take(3)?; // numparams, is_vararg, maxstacksize
        let instructions = self.size()?;
        let code = self.take(instructions.checked_mul(4).ok_or("code out of range")?)?;
        let mut found = code.chunks_exact(4).any(|i| {
            let word = u32::from_ne_bytes([i[0], i[1], i[2], i[3]]);
            word & 0x7f == OP_TBC
        });
        for _ in 0..self.size()? {
            // Constants: a type tag, then the value.
            match self.byte()? {
                0x00 | 0x01 | 0x11 => {} // nil, false, true
                0x03 | 0x13 => {
                    self.take(8)?; // integer, float
                }
                0x04 | 0x14 => self.string()?, // short, long string
                _ => return Err("unknown constant type"),
            }
        }
        let upvalues = self.size()?;
        self.take(upvalues.checked_mul(3).ok_or("upvalues out of range")?)?;
        for _ in 0..self.size()? {
            found |= self.function(depth + 1)?;
        }
        // Debug information (empty when stripped, but read all the same).
        let lines = self.size()?;
        self.take(lines)?;
        for _ in 0..self.size()? {
            self.size()?;
            self.size()?;
        }
        for _ in 0..self.size()? {
            self.string()?;
            self.size()?;
            self.size()?;
        }
        for _ in 0..self.size()? {
            self.string()?;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::declares_to_be_closed;
    use mlua::Lua;

    fn check(source: &str) -> bool {
        let lua = Lua::new();
        let f = lua.load(source).into_function().expect("compiles");
        declares_to_be_closed(&f.dump(true)).expect("readable")
    }

    #[test]
    fn finds_a_to_be_closed_variable_however_it_is_spelled_and_nested() {
        assert!(check("local x <close> = nil"));
        assert!(check("local x < --[[ a comment ]] close\n> = nil"));
        assert!(check(
            "local t = {1.5, 2, 'long string constant', true}\n\
             local function f(a, ...)\n  return function()\n    local y <close> = nil\n  end\nend"
        ));
        assert!(check("local a <const>, b <close> = 1, nil"));
    }

    #[test]
    fn code_without_one_passes() {
        assert!(!check("local x <const> = 1 return x"));
        assert!(!check(
            "local s = 'local x <close> = nil' -- <close>\nlocal a, close = 1, 2\nreturn a < close and close > a"
        ));
        assert!(!check(
            "local t = {} for i = 1, 10 do t[i] = function() return i * 1.5 end end return t"
        ));
    }

    #[test]
    fn other_bytes_are_refused() {
        assert!(declares_to_be_closed(b"").is_err());
        assert!(declares_to_be_closed(b"\x1bLua\x53\x00").is_err());
        let lua = Lua::new();
        let dump = lua
            .load("return 1")
            .into_function()
            .expect("compiles")
            .dump(true);
        assert!(declares_to_be_closed(&dump[..dump.len() - 1]).is_err());
    }
}
