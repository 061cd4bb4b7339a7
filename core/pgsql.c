/*
 * Comment pairs and SET/RESET statements, read from a client's SQL text.
 * Both rest on one small lexer that splits SQL the way PostgreSQL's does
 * where it matters here: strings ('', E'\'', U&'', $tag$), quoted
 * identifiers, nested block comments, line comments, words and numbers.
 * Everything else is one byte at a time, which is enough: a comment or a
 * quote cannot start inside an operator. The lexer never reads past the
 * NUL, and an unterminated string or comment is an error token that ends
 * the scan.
 *
 * It does not parse SQL beyond SET and RESET, does not know the server's
 * settings, and does not validate what a setting's value means. The
 * PostgreSQL face calls it; core/test/test_pgsql.c tests it.
 */
#include "pgsql.h"

#include <limits.h>
#include <string.h>
#include <strings.h>

enum tok_kind {
	TOK_END,           /* the NUL */
	TOK_SPACE,
	TOK_COMMENT,       /* a whole block comment, nested ones inside */
	TOK_LINE_COMMENT,
	TOK_WORD,          /* identifier or keyword, unquoted */
	TOK_QIDENT,        /* "quoted identifier" */
	TOK_STRING,
	TOK_NUMBER,
	TOK_PARAM,         /* $1 */
	TOK_OP,            /* any other single byte */
	TOK_ERROR,         /* unterminated string, identifier or comment */
};

enum str_kind {
	STR_PLAIN,         /* '...' (also the body of B'', X'', N'': the letter is a word before it) */
	STR_ESCAPE,        /* E'...' */
	STR_UNICODE,       /* U&'...' or U&"..." */
	STR_DOLLAR,        /* $tag$...$tag$ */
};

struct tok {
	enum tok_kind kind;
	enum str_kind str;
	bool bad;          /* a number run into letters (0x1F, 1_000, 1abc) */
	size_t tag_len;    /* STR_DOLLAR: length of "$tag$" */
	const char *start;
	const char *end;   /* one past the token */
};

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static bool is_hex(char c)
{
	return is_digit(c) || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

static int hex_value(char c)
{
	return is_digit(c) ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* Bytes from 0x80 up are letters to PostgreSQL's lexer, whatever the encoding. */
static bool ident_start(char c)
{
	unsigned char u = (unsigned char)c;
	return ((u | 0x20) >= 'a' && (u | 0x20) <= 'z') || u == '_' || u >= 0x80;
}

static bool ident_cont(char c)
{
	return ident_start(c) || is_digit(c) || c == '$';
}

/* The length of "$tag$" or "$$" at p, 0 when p does not open a dollar quote. */
static size_t dollar_tag_len(const char *p)
{
	size_t n = 1;
	if (ident_start(p[1])) {
		n = 2;
		while (ident_start(p[n]) || is_digit(p[n]))
			n++;
	}
	return p[n] == '$' ? n + 1 : 0;
}

/*
 * Past the closing quote q of a literal whose body starts at p: a doubled
 * quote is one quote, and with backslash a backslash takes the next byte.
 * NULL when the NUL comes first.
 */
static const char *skip_quoted(const char *p, char q, bool backslash)
{
	for (;;) {
		if (!*p)
			return NULL;
		if (backslash && *p == '\\') {
			if (!p[1])
				return NULL;
			p += 2;
		} else if (*p == q) {
			if (p[1] != q)
				return p + 1;
			p += 2;
		} else {
			p++;
		}
	}
}

/*
 * Past the end of a block comment that opens at p. Comments nest, and
 * "/" "*" or "*" "/" are read two bytes at a time from left to right as the
 * server reads them, so "/" "*" "/" opens without closing.
 */
static const char *skip_comment(const char *p)
{
	size_t depth = 1;
	p += 2;
	while (*p) {
		if (p[0] == '/' && p[1] == '*') {
			depth++;
			p += 2;
		} else if (p[0] == '*' && p[1] == '/') {
			p += 2;
			if (--depth == 0)
				return p;
		} else {
			p++;
		}
	}
	return NULL;
}

/* Past the letters, digits, '_' and '$' a number or parameter runs into. */
static const char *skip_junk(const char *p, bool *bad)
{
	if (ident_start(*p)) {
		*bad = true;
		while (ident_cont(*p))
			p++;
	}
	return p;
}

/* The token at p. */
static void lex(const char *p, struct tok *t)
{
	const char *q;
	char c = *p;

	t->kind = TOK_OP;
	t->str = STR_PLAIN;
	t->bad = false;
	t->tag_len = 0;
	t->start = p;
	t->end = p + 1;
	if (!c) {
		t->kind = TOK_END;
		t->end = p;
	} else if (is_space(c)) {
		while (is_space(*p))
			p++;
		t->kind = TOK_SPACE;
		t->end = p;
	} else if (c == '-' && p[1] == '-') {
		p += 2;
		while (*p && *p != '\n' && *p != '\r')
			p++;
		t->kind = TOK_LINE_COMMENT;
		t->end = p;
	} else if (c == '/' && p[1] == '*') {
		q = skip_comment(p);
		t->kind = q ? TOK_COMMENT : TOK_ERROR;
		t->end = q ? q : p + strlen(p);
	} else if (c == '\'' || c == '"') {
		q = skip_quoted(p + 1, c, false);
		t->kind = !q ? TOK_ERROR : c == '"' ? TOK_QIDENT : TOK_STRING;
		t->end = q ? q : p + strlen(p);
	} else if ((c | 0x20) == 'e' && p[1] == '\'') {
		/* A word that is just "E" before a quote: the one string a backslash escapes in. */
		q = skip_quoted(p + 2, '\'', true);
		t->kind = q ? TOK_STRING : TOK_ERROR;
		t->str = STR_ESCAPE;
		t->end = q ? q : p + strlen(p);
	} else if ((c | 0x20) == 'u' && p[1] == '&' && (p[2] == '\'' || p[2] == '"')) {
		q = skip_quoted(p + 3, p[2], false);
		t->kind = !q ? TOK_ERROR : p[2] == '"' ? TOK_QIDENT : TOK_STRING;
		t->str = STR_UNICODE;
		t->end = q ? q : p + strlen(p);
	} else if (ident_start(c)) {
		while (ident_cont(*p))
			p++;
		t->kind = TOK_WORD;
		t->end = p;
	} else if (is_digit(c) || (c == '.' && is_digit(p[1]))) {
		while (is_digit(*p))
			p++;
		/* "1..2" is 1 and "..": only one dot belongs to a number. */
		if (*p == '.' && p[1] != '.') {
			p++;
			while (is_digit(*p))
				p++;
		}
		if ((*p | 0x20) == 'e' &&
		    (is_digit(p[1]) || ((p[1] == '+' || p[1] == '-') && is_digit(p[2])))) {
			p += 2;
			while (is_digit(*p))
				p++;
		}
		t->kind = TOK_NUMBER;
		t->end = skip_junk(p, &t->bad);
	} else if (c == '$' && is_digit(p[1])) {
		p++;
		while (is_digit(*p))
			p++;
		t->kind = TOK_PARAM;
		t->end = skip_junk(p, &t->bad);
	} else if (c == '$' && (t->tag_len = dollar_tag_len(p)) > 0) {
		/*
		 * The body ends at the first "$tag$". A tag never holds a '$', so
		 * each comparison stops at the next one: the search stays linear.
		 */
		size_t n = t->tag_len;
		t->kind = TOK_ERROR;
		t->str = STR_DOLLAR;
		t->end = p + strlen(p);
		for (q = p + n; (q = strchr(q, '$')) != NULL; q++) {
			if (strncmp(q, p, n) == 0) {
				t->kind = TOK_STRING;
				t->end = q + n;
				break;
			}
		}
	}
}

/* The next token at p that is not white space or a comment. */
static void lex_sig(const char *p, struct tok *t)
{
	for (;;) {
		lex(p, t);
		if (t->kind != TOK_SPACE && t->kind != TOK_COMMENT && t->kind != TOK_LINE_COMMENT)
			return;
		p = t->end;
	}
}

static void advance(struct tok *t)
{
	lex_sig(t->end, t);
}

static void peek(const struct tok *t, struct tok *next)
{
	lex_sig(t->end, next);
}

/*
 * A bounded string under construction, NUL-terminated at every step. With
 * buf NULL it only checks, so a list's later values can be validated
 * without a place to put them.
 */
struct sink {
	char *buf;
	size_t cap;
	size_t len;
};

static int sink_put(struct sink *s, char c)
{
	if (!s->buf)
		return 0;
	if (s->len + 1 >= s->cap)
		return -1;
	s->buf[s->len++] = c;
	s->buf[s->len] = '\0';
	return 0;
}

static int sink_putn(struct sink *s, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (sink_put(s, p[i]) < 0)
			return -1;
	return 0;
}

static void sink_init(struct sink *s, char *buf, size_t cap)
{
	s->buf = cap ? buf : NULL;
	s->cap = cap;
	s->len = 0;
	if (s->buf)
		s->buf[0] = '\0';
}

/* ---- comment pairs ---- */

struct pairs {
	struct req_pair *out;
	int max;
	int n;
	char *buf;
	size_t buflen;
	size_t used;
	bool full;         /* out or buf ran out: the rest are dropped */
};

/* Decode %XX in place; the rest stays as it is (a lone '%' too). */
static size_t url_decode_in_place(char *s, size_t len)
{
	size_t r = 0, w = 0;
	while (r < len) {
		if (s[r] == '%' && r + 2 < len && is_hex(s[r + 1]) && is_hex(s[r + 2])) {
			s[w++] = (char)(hex_value(s[r + 1]) * 16 + hex_value(s[r + 2]));
			r += 3;
		} else {
			s[w++] = s[r++];
		}
	}
	s[w] = '\0';
	return w;
}

static bool is_key_byte(char c)
{
	unsigned char u = (unsigned char)c;
	return u > ' ' && u != 0x7f && c != '\'' && c != '"' && c != ',' && c != '=' && c != ':';
}

static const char *skip_blank(const char *p, const char *end)
{
	while (p < end && is_space(*p))
		p++;
	return p;
}

/*
 * Add one pair. The key is written first where it would stay, so a
 * duplicate or a key that does not decode costs nothing; a string that
 * does not fit ends the whole read, so no later pair can stand in for it.
 */
static void emit_pair(struct pairs *ps, const char *ks, const char *ke, const char *vs, const char *ve,
		      bool commenter)
{
	struct sink key, val;
	char *k, *v;

	if (ps->full)
		return;
	if (ps->n >= ps->max) {
		ps->full = true;
		return;
	}
	k = ps->buf + ps->used;
	sink_init(&key, k, ps->buflen - ps->used);
	if (!key.buf || sink_putn(&key, ks, (size_t)(ke - ks)) < 0) {
		ps->full = true;
		return;
	}
	if (commenter) {
		key.len = url_decode_in_place(k, key.len);
		if (key.len != strlen(k))
			return; /* a %00 would cut it short */
	}
	if (key.len == 0)
		return;
	for (int i = 0; i < ps->n; i++)
		if (strcmp(ps->out[i].name, k) == 0)
			return;
	v = k + key.len + 1;
	sink_init(&val, v, ps->buflen - ps->used - key.len - 1);
	if (!val.buf) {
		ps->full = true;
		return;
	}
	if (commenter) {
		/* Unescape, then URL-decode: the reverse of how sqlcommenter writes a value. */
		for (const char *p = vs; p < ve; p++) {
			if (*p == '\\' && p + 1 < ve)
				p++;
			if (sink_put(&val, *p) < 0) {
				ps->full = true;
				return;
			}
		}
		val.len = url_decode_in_place(v, val.len);
		if (val.len != strlen(v))
			return;
	} else if (sink_putn(&val, vs, (size_t)(ve - vs)) < 0) {
		ps->full = true;
		return;
	}
	ps->out[ps->n].name = k;
	ps->out[ps->n].value = v;
	ps->n++;
	ps->used += key.len + 1 + val.len + 1;
}

/* The pairs in [p, end): a stretch of one comment's own text. */
static void read_pairs(struct pairs *ps, const char *p, const char *end)
{
	while (p < end && !ps->full) {
		const char *ks, *ke, *vs, *ve;
		p = skip_blank(p, end);
		if (p < end && *p == ',') {
			p++;
			continue;
		}
		if (p >= end)
			break;
		ks = p;
		while (p < end && is_key_byte(*p))
			p++;
		ke = p;
		p = skip_blank(p, end);
		if (ke > ks && p < end && *p == '=') {
			p = skip_blank(p + 1, end);
			if (p < end && *p == '\'') {
				vs = ++p;
				while (p < end && *p != '\'')
					p += (*p == '\\' && p + 1 < end) ? 2 : 1;
				if (p >= end)
					break;          /* an open quote leaves nothing to read */
				ve = p;
				p = skip_blank(p + 1, end);
				if (p >= end || *p == ',') {
					emit_pair(ps, ks, ke, vs, ve, true);
					continue;
				}
			}
		} else if (ke > ks && p < end && *p == ':') {
			vs = skip_blank(p + 1, end);
			p = vs;
			while (p < end && *p != ',')
				p++;
			ve = p;
			while (ve > vs && is_space(ve[-1]))
				ve--;
			emit_pair(ps, ks, ke, vs, ve, false);
			continue;
		}
		/* Neither form: drop this pair, read on after the next comma. */
		while (p < end && *p != ',')
			p++;
	}
}

/*
 * The text of the comment [start, end) (its "/" "*" and "*" "/" included):
 * the outermost comment's own text, read in stretches around the nested
 * comments, which are skipped. The lexer found the end with the same rules,
 * so the nesting is balanced here.
 */
static void read_comment(struct pairs *ps, const char *start, const char *end)
{
	const char *p = start + 2, *text = p, *stop = end - 2;
	size_t depth = 0;
	while (p < stop) {
		if (p[0] == '/' && p + 1 < stop && p[1] == '*') {
			if (depth++ == 0)
				read_pairs(ps, text, p);
			p += 2;
		} else if (p[0] == '*' && p + 1 < stop && p[1] == '/') {
			p += 2;
			if (depth > 0 && --depth == 0)
				text = p;
		} else {
			p++;
		}
	}
	if (depth == 0)
		read_pairs(ps, text, stop);
}

/* Whether sql has "/\*" or "--" anywhere: without, it has no comment (and lexing it is for nothing). */
static bool may_comment(const char *sql)
{
	for (const char *p = strpbrk(sql, "/-"); p; p = strpbrk(p + 1, "/-"))
		if (p[1] == (p[0] == '/' ? '*' : '-'))
			return true;
	return false;
}

int pgsql_comments(const char *sql, struct req_pair *out, int max, char *buf, size_t buflen)
{
	struct pairs ps = { .out = out, .max = max, .buf = buf, .buflen = buflen };
	struct tok t;

	if (!sql || !out || max <= 0 || !buf || buflen == 0)
		return 0;
	buf[0] = '\0';
	if (!may_comment(sql))
		return 0;
	for (lex(sql, &t); t.kind != TOK_END && t.kind != TOK_ERROR && !ps.full; lex(t.end, &t))
		if (t.kind == TOK_COMMENT)
			read_comment(&ps, t.start, t.end);
	return ps.n;
}

/* ---- SET and RESET ---- */

/*
 * The keywords that cannot be a setting's name unquoted: PostgreSQL's
 * reserved keywords (reserved) and those that can only be a function or
 * type name. Only reserved ones are refused as a bare value, and of those
 * TRUE, FALSE and ON are allowed there.
 */
struct keyword {
	const char *word;
	bool reserved;
};

static const struct keyword keywords[] = {
	{ "all", true }, { "analyse", true }, { "analyze", true }, { "and", true }, { "any", true },
	{ "array", true }, { "as", true }, { "asc", true }, { "asymmetric", true },
	{ "authorization", false }, { "binary", false }, { "both", true }, { "case", true },
	{ "cast", true }, { "check", true }, { "collate", true }, { "collation", false },
	{ "column", true }, { "concurrently", false }, { "constraint", true }, { "create", true },
	{ "cross", false }, { "current_catalog", true }, { "current_date", true },
	{ "current_role", true }, { "current_schema", false }, { "current_time", true },
	{ "current_timestamp", true }, { "current_user", true }, { "default", true },
	{ "deferrable", true }, { "desc", true }, { "distinct", true }, { "do", true },
	{ "else", true }, { "end", true }, { "except", true }, { "false", true }, { "fetch", true },
	{ "for", true }, { "foreign", true }, { "freeze", false }, { "from", true },
	{ "full", false }, { "grant", true }, { "group", true }, { "having", true },
	{ "ilike", false }, { "in", true }, { "initially", true }, { "inner", false },
	{ "intersect", true }, { "into", true }, { "is", false }, { "isnull", false },
	{ "join", false }, { "lateral", true }, { "leading", true }, { "left", false },
	{ "like", false }, { "limit", true }, { "localtime", true }, { "localtimestamp", true },
	{ "natural", false }, { "not", true }, { "notnull", false }, { "null", true },
	{ "offset", true }, { "on", true }, { "only", true }, { "or", true }, { "order", true },
	{ "outer", false }, { "overlaps", false }, { "placing", true }, { "primary", true },
	{ "references", true }, { "returning", true }, { "right", false }, { "select", true },
	{ "session_user", true }, { "similar", false }, { "some", true }, { "symmetric", true },
	{ "system_user", true }, { "table", true }, { "tablesample", false }, { "then", true },
	{ "to", true }, { "trailing", true }, { "true", true }, { "union", true },
	{ "unique", true }, { "user", true }, { "using", true }, { "variadic", true },
	{ "verbose", false }, { "when", true }, { "where", true }, { "window", true },
	{ "with", true },
};

/* The keyword s (n bytes, any case) is, or NULL. */
static const struct keyword *find_keyword(const char *s, size_t n)
{
	for (size_t i = 0; i < sizeof(keywords) / sizeof(keywords[0]); i++)
		if (strlen(keywords[i].word) == n && strncasecmp(keywords[i].word, s, n) == 0)
			return &keywords[i];
	return NULL;
}

static size_t tok_len(const struct tok *t)
{
	return (size_t)(t->end - t->start);
}

static bool is_word(const struct tok *t, const char *w)
{
	return t->kind == TOK_WORD && tok_len(t) == strlen(w) && strncasecmp(t->start, w, tok_len(t)) == 0;
}

static bool is_op(const struct tok *t, char c)
{
	return t->kind == TOK_OP && *t->start == c;
}

/* At the end of the statement: an optional ';', then nothing but white space and comments. */
static bool at_end(struct tok *t)
{
	if (is_op(t, ';'))
		advance(t);
	return t->kind == TOK_END;
}

/*
 * Does t, after a word that can open a special form (SESSION, LOCAL,
 * NAMES, ROLE ...), make that word a setting's name instead? As in the
 * server's grammar: "SET role = x" sets the setting named role.
 */
static bool names_setting(const struct tok *t)
{
	return is_op(t, '=') || is_op(t, '.') || is_word(t, "to") || is_word(t, "from");
}

static int put_lower(struct sink *s, const struct tok *t)
{
	for (const char *p = t->start; p < t->end; p++) {
		char c = (*p >= 'A' && *p <= 'Z') ? (char)(*p | 0x20) : *p;
		if (sink_put(s, c) < 0)
			return -1;
	}
	return 0;
}

/* The body of a quoted identifier, "" made one quote. */
static int put_qident(struct sink *s, const struct tok *t)
{
	for (const char *p = t->start + 1; p < t->end - 1; p++) {
		if (*p == '"')
			p++;
		if (sink_put(s, *p) < 0)
			return -1;
	}
	return 0;
}

static bool empty_qident(const struct tok *t)
{
	return tok_len(t) == 2;
}

/* The parts of a name, joined as the server joins them; parse_name judges the join. */
static int parse_name_parts(struct tok *t, char *name, size_t size)
{
	struct sink s;
	sink_init(&s, name, size);
	for (;;) {
		if (t->kind == TOK_WORD && !find_keyword(t->start, tok_len(t))) {
			if (put_lower(&s, t) < 0)
				return -1;
		} else if (t->kind == TOK_QIDENT && t->str != STR_UNICODE && !empty_qident(t)) {
			if (put_qident(&s, t) < 0)
				return -1;
		} else {
			return -1;
		}
		advance(t);
		if (!is_op(t, '.'))
			return 0;
		if (sink_put(&s, '.') < 0)
			return -1;
		advance(t);
	}
}

/*
 * A setting's name: parts joined with '.', each a non-keyword word or a
 * quoted identifier. The server joins them the same way, so a quoted part
 * may hold dots; but a join with an empty part ("a." "b" is "a..b") could
 * not be written back as parts, and the server refuses such names anyway.
 */
static int parse_name(struct tok *t, char *name, size_t size)
{
	int rc = parse_name_parts(t, name, size);
	size_t n = strlen(name);
	if (rc < 0 || n == 0 || name[0] == '.' || name[n - 1] == '.' || strstr(name, ".."))
		return -1;
	return 0;
}

/* A code point as UTF-8; surrogates, 0 and anything past U+10FFFF are refused, as the server does. */
static int put_utf8(struct sink *s, unsigned long cp)
{
	if (cp == 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return -1;
	if (cp < 0x80)
		return sink_put(s, (char)cp);
	if (cp < 0x800)
		return sink_put(s, (char)(0xc0 | (cp >> 6))) | sink_put(s, (char)(0x80 | (cp & 0x3f)));
	if (cp < 0x10000)
		return sink_put(s, (char)(0xe0 | (cp >> 12))) | sink_put(s, (char)(0x80 | ((cp >> 6) & 0x3f))) |
		       sink_put(s, (char)(0x80 | (cp & 0x3f)));
	return sink_put(s, (char)(0xf0 | (cp >> 18))) | sink_put(s, (char)(0x80 | ((cp >> 12) & 0x3f))) |
	       sink_put(s, (char)(0x80 | ((cp >> 6) & 0x3f))) | sink_put(s, (char)(0x80 | (cp & 0x3f)));
}

/*
 * The escape after a backslash at *pp (inside an E'' string ending at
 * end); *pp is left on the escape's last byte. -1 for what the server
 * refuses (a zero byte, a short \u), or when the sink is full.
 */
static int put_escape(struct sink *s, const char **pp, const char *end)
{
	const char *p = *pp;
	unsigned long v = 0;
	int n = 0, want;

	switch (*p) {
	case 'b':
		return sink_put(s, '\b');
	case 'f':
		return sink_put(s, '\f');
	case 'n':
		return sink_put(s, '\n');
	case 'r':
		return sink_put(s, '\r');
	case 't':
		return sink_put(s, '\t');
	case 'x':
		while (n < 2 && p + 1 < end && is_hex(p[1])) {
			v = v * 16 + (unsigned long)hex_value(*++p);
			n++;
		}
		*pp = p;
		if (n == 0)
			return sink_put(s, 'x');
		return v ? sink_put(s, (char)v) : -1;
	case 'u':
	case 'U':
		want = *p == 'u' ? 4 : 8;
		while (n < want && p + 1 < end && is_hex(p[1])) {
			v = v * 16 + (unsigned long)hex_value(*++p);
			n++;
		}
		*pp = p;
		return n == want ? put_utf8(s, v) : -1;
	default:
		if (*p >= '0' && *p <= '7') {
			while (n < 3 && p < end && *p >= '0' && *p <= '7') {
				v = v * 8 + (unsigned long)(*p - '0');
				p++;
				n++;
			}
			*pp = p - 1;
			/* The server keeps the low byte of \400 and up, and refuses a zero byte. */
			return (v & 0xff) ? sink_put(s, (char)(v & 0xff)) : -1;
		}
		return sink_put(s, *p);
	}
}

/* The text of a string token. */
static int put_string(struct sink *s, const struct tok *t)
{
	const char *p, *end;
	if (t->str == STR_DOLLAR)
		return sink_putn(s, t->start + t->tag_len, tok_len(t) - 2 * t->tag_len);
	p = t->start + (t->str == STR_ESCAPE ? 2 : 1);
	end = t->end - 1;
	for (; p < end; p++) {
		if (*p == '\'') {
			p++;            /* the lexer let only doubled quotes through */
			if (sink_put(s, '\'') < 0)
				return -1;
		} else if (*p == '\\' && t->str == STR_ESCAPE) {
			p++;
			if (put_escape(s, &p, end) < 0)
				return -1;
		} else if (sink_put(s, *p) < 0) {
			return -1;
		}
	}
	return 0;
}

/* What a value may be, by the place it stands in. */
enum {
	VAL_STRING = 1,    /* a string literal */
	VAL_WORD = 2,      /* a non-reserved word or a quoted identifier */
	VAL_BOOL = 4,      /* TRUE, FALSE, ON */
	VAL_NUMBER = 8,    /* a decimal number, signed */
};

/*
 * One value at t, decoded into s (which may be a checking sink), t left
 * after it and *vend at its end. 0 when read, 1 when well-formed but not
 * fitting s, -1 when it is not a value this reads.
 */
static int parse_value(struct tok *t, unsigned allowed, struct sink *s, const char **vend)
{
	const struct keyword *kw;
	int rc = 0;

	if (t->kind == TOK_STRING && (allowed & VAL_STRING) && t->str != STR_UNICODE) {
		rc = put_string(s, t);
		if (rc < 0 && t->str == STR_ESCAPE) {
			/* A refused escape and a full sink look alike: check again with no sink. */
			struct sink check = { 0 };
			if (put_string(&check, t) < 0)
				return -1;
		}
	} else if (t->kind == TOK_QIDENT && (allowed & VAL_WORD) && t->str != STR_UNICODE &&
		   !empty_qident(t)) {
		rc = put_qident(s, t);
	} else if (t->kind == TOK_WORD && (allowed & (VAL_WORD | VAL_BOOL))) {
		kw = find_keyword(t->start, tok_len(t));
		if (kw && kw->reserved) {
			if (!(allowed & VAL_BOOL) ||
			    !(is_word(t, "true") || is_word(t, "false") || is_word(t, "on")))
				return -1;
		} else if (!(allowed & VAL_WORD)) {
			return -1;
		}
		rc = put_lower(s, t);
	} else if ((allowed & VAL_NUMBER) && (is_op(t, '+') || is_op(t, '-'))) {
		char sign = *t->start;
		advance(t);
		if (t->kind != TOK_NUMBER || t->bad)
			return -1;
		rc = sink_put(s, sign) | sink_putn(s, t->start, tok_len(t));
	} else if ((allowed & VAL_NUMBER) && t->kind == TOK_NUMBER && !t->bad) {
		rc = sink_putn(s, t->start, tok_len(t));
	} else {
		return -1;
	}
	*vend = t->end;
	advance(t);
	return rc < 0 ? 1 : 0;
}

/* One value, the whole value part: into out->value, refused when it does not fit. */
static int single_value(struct tok *t, unsigned allowed, struct pgsql_set *out)
{
	struct sink s;
	const char *start = t->start, *vend;
	sink_init(&s, out->value, sizeof(out->value));
	if (parse_value(t, allowed, &s, &vend) != 0)
		return -1;
	out->value_sql = start;
	out->value_sql_len = (size_t)(vend - start);
	return 0;
}

/* DEFAULT (or LOCAL, where that means the same) as the whole value part. */
static void set_default(struct tok *t, struct pgsql_set *out)
{
	out->value_default = true;
	out->value_sql = t->start;
	out->value_sql_len = tok_len(t);
	advance(t);
}

/* name {TO|=} {DEFAULT | value[, ...]} */
static int parse_generic(struct tok *t, struct pgsql_set *out)
{
	const char *start, *vend = NULL;
	struct sink s;
	int count = 0;
	bool truncated = false;

	if (parse_name(t, out->name, sizeof(out->name)) < 0)
		return -1;
	if (!is_op(t, '=') && !is_word(t, "to"))
		return -1;
	advance(t);
	if (is_word(t, "default")) {
		set_default(t, out);
		return 0;
	}
	start = t->start;
	sink_init(&s, out->value, sizeof(out->value));
	for (;;) {
		int rc = parse_value(t, VAL_STRING | VAL_WORD | VAL_BOOL | VAL_NUMBER, &s, &vend);
		if (rc < 0)
			return -1;
		if (count++ == 0) {
			truncated = rc > 0;
			s.buf = NULL;   /* later values are only checked */
		}
		if (!is_op(t, ','))
			break;
		advance(t);
	}
	if (count == 1 && truncated)
		return -1;
	if (count > 1) {
		out->value_list = true;
		out->value[0] = '\0';
	}
	out->value_sql = start;
	out->value_sql_len = (size_t)(vend - start);
	return 0;
}

static void set_name(struct pgsql_set *out, const char *name)
{
	strcpy(out->name, name);        /* the special forms' names are short constants */
}

/* What follows SET [SESSION | LOCAL]. */
static int parse_set_rest(struct tok *t, struct pgsql_set *out)
{
	struct tok next;
	peek(t, &next);

	if (is_word(t, "session") && is_word(&next, "authorization")) {
		set_name(out, "session_authorization");
		advance(t);
		advance(t);
		if (is_word(t, "default")) {
			set_default(t, out);
			return 0;
		}
		return single_value(t, VAL_STRING | VAL_WORD, out);
	}
	if (is_word(t, "time") && is_word(&next, "zone")) {
		set_name(out, "timezone");
		advance(t);
		advance(t);
		/* SET TIME ZONE LOCAL is the default, not a zone named "local". */
		if (is_word(t, "default") || is_word(t, "local")) {
			set_default(t, out);
			return 0;
		}
		return single_value(t, VAL_STRING | VAL_WORD | VAL_NUMBER, out);
	}
	if (is_word(t, "xml") && is_word(&next, "option")) {
		set_name(out, "xmloption");
		advance(t);
		advance(t);
		if (!is_word(t, "document") && !is_word(t, "content"))
			return -1;
		return single_value(t, VAL_WORD, out);
	}
	if (names_setting(&next))
		return parse_generic(t, out);
	if (is_word(t, "names")) {
		set_name(out, "client_encoding");
		advance(t);
		if (t->kind == TOK_END || is_op(t, ';')) {
			out->value_default = true;
			out->value_sql = t->start;
			out->value_sql_len = 0;
			return 0;
		}
		if (is_word(t, "default")) {
			set_default(t, out);
			return 0;
		}
		return single_value(t, VAL_STRING, out);
	}
	if (is_word(t, "schema")) {
		set_name(out, "search_path");
		advance(t);
		return single_value(t, VAL_STRING, out);
	}
	if (is_word(t, "role")) {
		set_name(out, "role");
		advance(t);
		return single_value(t, VAL_STRING | VAL_WORD, out);
	}
	/* Transaction modes, session characteristics, a snapshot, a catalog: not session settings. */
	if (is_word(t, "transaction") || is_word(t, "session") || is_word(t, "catalog"))
		return -1;
	return parse_generic(t, out);
}

static enum pgsql_set_kind parse_set(struct tok *t, struct pgsql_set *out)
{
	struct tok next;
	bool local = false;

	advance(t);
	if (is_word(t, "session") || is_word(t, "local")) {
		peek(t, &next);
		if (!names_setting(&next) && !(is_word(t, "session") && is_word(&next, "authorization"))) {
			local = is_word(t, "local");
			advance(t);
		}
	}
	if (parse_set_rest(t, out) < 0)
		return PGSQL_NOT_SET;
	return local ? PGSQL_SET_LOCAL : PGSQL_SET;
}

static enum pgsql_set_kind parse_reset(struct tok *t, struct pgsql_set *out)
{
	struct tok next;

	advance(t);
	peek(t, &next);
	if (is_word(t, "all")) {
		advance(t);
		return PGSQL_RESET_ALL;
	}
	if (is_word(t, "time") && is_word(&next, "zone")) {
		set_name(out, "timezone");
	} else if (is_word(t, "session") && is_word(&next, "authorization")) {
		set_name(out, "session_authorization");
	} else if (is_word(t, "transaction") && is_word(&next, "isolation")) {
		return PGSQL_NOT_SET;
	} else {
		return parse_name(t, out->name, sizeof(out->name)) < 0 ? PGSQL_NOT_SET : PGSQL_RESET;
	}
	advance(t);
	advance(t);
	return PGSQL_RESET;
}

enum pgsql_set_kind pgsql_classify_set(const char *sql, struct pgsql_set *out)
{
	enum pgsql_set_kind kind = PGSQL_NOT_SET;
	struct tok t;

	if (!out)
		return PGSQL_NOT_SET;
	memset(out, 0, sizeof(*out));
	if (!sql)
		return PGSQL_NOT_SET;
	lex_sig(sql, &t);
	if (is_word(&t, "set"))
		kind = parse_set(&t, out);
	else if (is_word(&t, "reset"))
		kind = parse_reset(&t, out);
	if (kind != PGSQL_NOT_SET && !at_end(&t))
		kind = PGSQL_NOT_SET;
	if (kind == PGSQL_NOT_SET)
		memset(out, 0, sizeof(*out));
	else if (kind == PGSQL_RESET || kind == PGSQL_RESET_ALL)
		out->value_sql = NULL;
	out->kind = kind;
	return kind;
}

/* ---- formatting a setting back ---- */

/* Would the name part [p, p + n) read back the same unquoted? Lower case, not a keyword. */
static bool bare_part(const char *p, size_t n)
{
	if (!((p[0] >= 'a' && p[0] <= 'z') || p[0] == '_'))
		return false;
	for (size_t i = 1; i < n; i++)
		if (!((p[i] >= 'a' && p[i] <= 'z') || is_digit(p[i]) || p[i] == '_' || p[i] == '$'))
			return false;
	return !find_keyword(p, n);
}

int pgsql_format_set(const char *name, const char *value_sql, size_t value_sql_len, bool reset,
		     char *buf, size_t buflen)
{
	struct sink s;
	const char *p;
	int rc;

	if (!buf || buflen == 0)
		return -1;
	sink_init(&s, buf, buflen);
	if (!name || !*name)
		return -1;
	if (!reset && (!value_sql || value_sql_len == 0 || memchr(value_sql, '\0', value_sql_len)))
		return -1;
	rc = sink_putn(&s, reset ? "RESET " : "SET ", reset ? 6 : 4);
	for (p = name; rc == 0;) {
		size_t n = strcspn(p, ".");
		if (n == 0)
			rc = -1;
		else if (bare_part(p, n))
			rc = sink_putn(&s, p, n);
		else {
			rc = sink_put(&s, '"');
			for (size_t i = 0; i < n && rc == 0; i++)
				rc = (p[i] == '"' ? sink_put(&s, '"') : 0) | sink_put(&s, p[i]);
			rc |= sink_put(&s, '"');
		}
		if (!p[n])
			break;
		if (rc == 0)
			rc = sink_put(&s, '.');
		p += n + 1;
	}
	if (rc == 0 && !reset)
		rc = sink_putn(&s, " TO ", 4) | sink_putn(&s, value_sql, value_sql_len);
	if (rc < 0 || s.len > INT_MAX) {
		buf[0] = '\0';
		return -1;
	}
	return (int)s.len;
}

const char *pgsql_tenant_hint(const struct req_pair *comment, int ncomment, const struct req_pair *session,
			      int nsession)
{
	for (int i = 0; i < ncomment; i++)
		if (strcmp(comment[i].name, "tenant") == 0)
			return comment[i].value;
	for (int i = 0; i < nsession; i++)
		if (strcmp(session[i].name, "tenant") == 0)
			return session[i].value;
	return NULL;
}

bool pgsql_pair(char *text, struct req_pair *out)
{
	char *eq = strchr(text, '=');
	if (!eq)
		return false;
	*eq = '\0';
	out->name = text;
	out->value = eq + 1;
	return true;
}

const char *pgsql_next_statement(const char *sql)
{
	struct tok t;
	/*
	 * Most statements quote nothing and comment nothing: their first ';'
	 * (or none) is the answer without lexing. Only a quote, a dollar or a
	 * comment's first character before it needs the lexer.
	 */
	for (const char *p = sql;; p++) {
		p = strpbrk(p, "'\"$-/;");
		if (!p)
			return NULL;
		if (*p == ';')
			return p + 1;
		/* A parameter ($1), a minus or a division sign starts nothing that could hide a ';'. */
		if (!((*p == '$' && is_digit(p[1])) || (*p == '-' && p[1] != '-') || (*p == '/' && p[1] != '*')))
			break;
	}
	for (lex(sql, &t); t.kind != TOK_END && t.kind != TOK_ERROR; lex(t.end, &t))
		if (is_op(&t, ';'))
			return t.end;
	return NULL;
}
