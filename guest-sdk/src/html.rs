//! HTML escaping, as the Lua `kvdb.escape_html`.

/// Escapes `s` for HTML text and quoted attribute values.
///
/// The same bytes as the Lua `kvdb.escape_html` (the host's `html-escape`
/// `encode_safe`): `&` `<` `>` `"` `'` `/` become `&amp;` `&lt;` `&gt;`
/// `&quot;` `&#x27;` `&#x2F;`; everything else is kept.
///
/// # Example
///
/// ```
/// assert_eq!(
///     kvdb_guest::escape_html("<a href='/'>Tom & Jerry</a>"),
///     "&lt;a href=&#x27;&#x2F;&#x27;&gt;Tom &amp; Jerry&lt;&#x2F;a&gt;",
/// );
/// ```
#[must_use]
pub fn escape_html(s: &str) -> String {
    // The same crate and function as the host: the same bytes by construction.
    html_escape::encode_safe(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::escape_html;

    #[test]
    fn escapes_the_six_characters_of_encode_safe() {
        assert_eq!(escape_html(r#"&<>"'/"#), "&amp;&lt;&gt;&quot;&#x27;&#x2F;");
    }

    #[test]
    fn keeps_everything_else() {
        assert_eq!(
            escape_html("héllo wörld = 1 + 2 ☃"),
            "héllo wörld = 1 + 2 ☃"
        );
        assert_eq!(escape_html(""), "");
    }
}
