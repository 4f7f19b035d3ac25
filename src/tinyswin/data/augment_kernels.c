/* Per-pixel augmentation kernels for CPU batches: one pass per sample instead of one PyTorch op per step.
 *
 * Built on first use by augment_native.py with the system C compiler (-O3 -ffp-contract=off, so that
 * no multiply-add is fused and every float32 expression rounds exactly as the PyTorch ops it replaces) and
 * called through ctypes. Each kernel reproduces the eager batched ops of augment_geometry.py,
 * augment_ops.py and augment_policy.py bit for bit (tests/test_augment_native.py checks them against those
 * ops and against torchvision): the same float32 expressions in the same order, the same clamping, the same
 * truncation or round-half-to-even back to whole numbers.
 *
 * Images are float32 (N, 3, H, W) contiguous batches of whole numbers in [0, 255] (uint8 semantics); the
 * crop kernel reads the uint8 source batch through its strides. Per-sample parameters come as float64 (the
 * Python floats torchvision receives) and are converted to float32 where torchvision's ops do so.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* truncation of a value >= 0 (the uint8 cast of a clamped value): floorf is one vector instruction with
 * SSE4.1 (or on ARM) but a library call without it, where the int conversion vectorizes instead */
#if defined(__SSE4_1__) || defined(__aarch64__) || defined(__ARM_NEON)
static inline float trunc_pos(float v) { return floorf(v); }
#else
static inline float trunc_pos(float v) { return (float)(int32_t)v; }
#endif

/* round half to even of 0 <= v < 2^22 (torch.round); exact with -ffp-contract=off, no fast-math */
static inline float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

/* clamps as two selections */
/* c ? a : b for c in {0, 1}, as bit operations: straight-line code that every compiler vectorizes (a
 * conditional expression needs if-conversion, which some compilers give up on in long loop bodies) */
static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float sel(int c, float a, float b) {
    uint32_t m = (uint32_t)0 - (uint32_t)c;
    uint32_t u = (float_bits(a) & m) | (float_bits(b) & ~m);
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline float clamp255(float v) {
    v = sel(v > 0.0f, v, 0.0f);
    return sel(v < 255.0f, v, 255.0f);
}

static inline float clamp01(float v) {
    v = sel(v > 0.0f, v, 0.0f);
    return sel(v < 1.0f, v, 1.0f);
}

/* ------------------------------------------------------------------------------------------- crop */

/* One output row of the horizontal pass: out[x] = round(kx[x] * row[x0[x]] + lx[x] * row[x0[x] + 1]).
 * row holds the source row and 8 more floats (zeros): where x0 is the last column, lx is 0. With AVX2,
 * 8 outputs whose taps lie within 8 consecutive source columns (always, when upsampling) take one load and
 * one in-register permutation per tap instead of 16 scalar loads; the arithmetic is the same. */
static void resample_row(const float *row, const int32_t *x0, const float *kx, const float *lx, int64_t ow,
                         float *restrict out) {
    int64_t x = 0;
#if defined(__AVX2__)
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    for (; x + 8 <= ow; x += 8) {
        int32_t first = x0[x], last = x0[x + 7];
        int32_t lo = first < last ? first : last, hi = first < last ? last : first;
        if (hi - lo > 7) break; /* a shrinking map: the scalar loop takes the rest */
        __m256i idx = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(x0 + x)), _mm256_set1_epi32(lo));
        __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row + lo), idx);
        __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row + lo + 1), idx);
        __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(kx + x), a), _mm256_mul_ps(_mm256_loadu_ps(lx + x), b));
        _mm256_storeu_ps(out + x, _mm256_sub_ps(_mm256_add_ps(v, magic), magic));
    }
#endif
    for (; x < ow; x++) out[x] = round_even(kx[x] * row[x0[x]] + lx[x] * row[x0[x] + 1]);
}

/* Bilinear resized crop (upsampling only) with flip of one sample, from uint8 to float32 whole numbers.
 *
 * src: the sample's uint8 image, element (c, y, x) at src[c*sc + y*sh + x*sw] (either layout).
 * sy: (oh) source row of each output row, sx: (ow) source column of each output column: absolute,
 *     already clamped to the crop and mirrored where flipped (float64).
 * out: (3, oh, ow) float32. work_row: 3 * (w + 8) floats; x0: ow int32; lx, kx: ow floats.
 * Separable: for each output row, the two source rows are blended into one row per channel, then the
 * columns. The caller uses this kernel only where every value is a dyadic rational that float32 holds
 * exactly (crops no larger than the output, output sides powers of two up to 64: weights k / 128,
 * products under 2^24), so the result, rounded half to even, is the same whole number as torchvision's
 * antialiased resize followed by round(), in any order of the two passes.
 */
static void crop_one(const uint8_t *src, int64_t h, int64_t w, int64_t sc, int64_t sh, int64_t sw,
                     const double *sy, const double *sx, int64_t oh, int64_t ow, float *out, float *work_row,
                     int32_t *restrict x0, float *restrict lx, float *restrict kx) {
    for (int64_t x = 0; x < ow; x++) {
        int32_t a = (int32_t)sx[x];
        x0[x] = a;
        lx[x] = (float)(sx[x] - (double)a); /* 0 where a is the last column */
        kx[x] = 1.0f - lx[x];
    }
    for (int64_t c = 0; c < 3; c++) memset(work_row + c * (w + 8) + w, 0, 8 * sizeof(float));
    for (int64_t y = 0; y < oh; y++) {
        int64_t r0 = (int64_t)sy[y];
        int64_t r1 = r0 + 1 < h ? r0 + 1 : h - 1;
        float ly = (float)(sy[y] - (double)r0), ky = 1.0f - ly;
        for (int64_t c = 0; c < 3; c++) {
            const uint8_t *top = src + c * sc + r0 * sh, *bottom = src + c * sc + r1 * sh;
            float *restrict row = work_row + c * (w + 8);
            if (sw == 1) {
                for (int64_t x = 0; x < w; x++) row[x] = ky * (float)top[x] + ly * (float)bottom[x];
            } else { /* channels last: every third byte */
                for (int64_t x = 0; x < w; x++) row[x] = ky * (float)top[x * sw] + ly * (float)bottom[x * sw];
            }
            resample_row(row, x0, kx, lx, ow, out + (c * oh + y) * ow);
        }
    }
}

/* ------------------------------------------------------------------------------------ colour ops */

/* torchvision rgb_to_grayscale on uint8: float32 0.2989 r + 0.587 g + 0.114 b, truncated */
static void grayscale(const float *r, const float *g, const float *b, float *restrict gray, int64_t hw) {
    for (int64_t k = 0; k < hw; k++) {
        float v = 0.2989f * r[k] + 0.587f * g[k];
        gray[k] = trunc_pos(v + 0.114f * b[k]);
    }
}

/* x = trunc(clamp(keep * x + other_deg)), other_deg = float32((1 - f)) * degenerate, on one plane */
static void blend_plane(float *restrict x, const float *restrict weighted, float keep, int64_t hw) {
    for (int64_t k = 0; k < hw; k++) x[k] = trunc_pos(clamp255(keep * x[k] + weighted[k]));
}

static void blend_scalar(float *x, float weighted, float keep, int64_t hw) {
    for (int64_t k = 0; k < hw; k++) x[k] = trunc_pos(clamp255(keep * x[k] + weighted));
}

static void brightness(float *img, double f, int64_t hw) {
    float keep = (float)f;
    for (int64_t k = 0; k < 3 * hw; k++) img[k] = trunc_pos(clamp255(keep * img[k]));
}

/* blend with the grayscale image (saturation, RandAugment's Color) */
static void saturation(float *img, double f, int64_t hw, float *work) {
    float keep = (float)f, other = (float)(1.0 - f);
    grayscale(img, img + hw, img + 2 * hw, work, hw);
    for (int64_t k = 0; k < hw; k++) work[k] = work[k] * other;
    for (int64_t c = 0; c < 3; c++) blend_plane(img + c * hw, work, keep, hw);
}

/* blend with the mean of the truncated grayscale image; the sum of whole numbers is exact, and torch's
 * float32 mean is the correctly rounded sum / count */
static void contrast(float *img, double f, int64_t hw, float *work) {
    float keep = (float)f, other = (float)(1.0 - f);
    grayscale(img, img + hw, img + 2 * hw, work, hw);
    double sum = 0.0;
    for (int64_t k = 0; k < hw; k++) sum += work[k];
    float mean = (float)sum / (float)hw;
    for (int64_t c = 0; c < 3; c++) blend_scalar(img + c * hw, mean * other, keep, hw);
}

/* blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13 (rounded; the border is kept) */
static void sharpness(float *img, double f, int64_t h, int64_t w, float *work) {
    if (h <= 2 || w <= 2) return;
    float keep = (float)f, other = (float)(1.0 - f);
    int64_t hw = h * w;
    for (int64_t c = 0; c < 3; c++) {
        float *x = img + c * hw;
        for (int64_t k = 0; k < hw; k++) work[k] = x[k] * other;
        for (int64_t y = 1; y < h - 1; y++) {
            const float *up = x + (y - 1) * w, *mid = x + y * w, *down = x + (y + 1) * w;
            for (int64_t j = 1; j < w - 1; j++) {
                float box = up[j - 1] + up[j] + up[j + 1] + mid[j - 1] + mid[j] + mid[j + 1] + down[j - 1] +
                            down[j] + down[j + 1];
                float smooth = round_even((box + 4.0f * mid[j]) / 13.0f);
                work[y * w + j] = clamp255(smooth) * other;
            }
        }
        blend_plane(x, work, keep, hw);
    }
}

static void posterize(float *img, double bits, int64_t hw) {
    float step = (float)(1 << (8 - (int)bits));
    for (int64_t k = 0; k < 3 * hw; k++) img[k] = trunc_pos(img[k] / step) * step;
}

static void solarize(float *img, double threshold, int64_t hw) {
    float t = (float)threshold;
    for (int64_t k = 0; k < 3 * hw; k++) img[k] = sel(img[k] >= t, 255.0f - img[k], img[k]);
}

static void autocontrast(float *img, int64_t hw) {
    for (int64_t c = 0; c < 3; c++) {
        float *x = img + c * hw;
        float lo = x[0], hi = x[0];
        for (int64_t k = 1; k < hw; k++) {
            lo = x[k] < lo ? x[k] : lo;
            hi = x[k] > hi ? x[k] : hi;
        }
        if (hi == lo) continue; /* 255 / 0 is not finite: torchvision leaves the channel as it is */
        float scale = (1.0f / (hi - lo)) * 255.0f; /* torch's 255.0 / t is reciprocal(t) * 255 */
        for (int64_t k = 0; k < hw; k++) x[k] = trunc_pos(clamp255((x[k] - lo) * scale));
    }
}

/* torchvision's uint8 equalize: look-up table from the cumulative histogram, step from all but the last
 * non-empty bin; channels whose step is 0 stay unchanged */
static void equalize(float *img, int64_t hw) {
    for (int64_t c = 0; c < 3; c++) {
        float *x = img + c * hw;
        int64_t hist[256], lut[256];
        memset(hist, 0, sizeof(hist));
        int64_t top = 0;
        for (int64_t k = 0; k < hw; k++) {
            int64_t v = (int64_t)x[k];
            hist[v]++;
            top = v > top ? v : top;
        }
        int64_t step = (hw - hist[top]) / 255;
        if (step == 0) continue;
        int64_t cum = 0;
        for (int v = 0; v < 256; v++) {
            int64_t value = (cum + step / 2) / step;
            lut[v] = value > 255 ? 255 : value;
            cum += hist[v];
        }
        for (int64_t k = 0; k < hw; k++) x[k] = (float)lut[(int64_t)x[k]];
    }
}

/* torchvision's adjust_hue on uint8: _rgb2hsv of x / 255, hue shift modulo 1, _hsv2rgb, x * 255.999
 * truncated; the same float32 expressions, pixel by pixel, with fewer divisions. In _rgb2hsv the channel
 * holding the minimum gives (maxc - minc) / cr = 1 exactly and the maximum 0, so of rc, gc, bc only the
 * middle channel's u = (maxc - mid / 255) / cr needs a division, and the hue of each (max, min) case is
 * torchvision's expression with those values filled in: max r: bc - gc = u - 1 (min g) or 1 - u (min b);
 * max g: (2 + rc) - bc = 3 - u (min r) or (2 + u) - 1 (min b); max b: (4 + gc) - rc = (4 + u) - 1 (min r)
 * or 5 - u (min g). Ties between channels give the same value either way; gray pixels (s = 0) come back
 * unchanged whatever the hue. */
static void hue(float *img, double factor, int64_t hw) {
    float shift = (float)factor;
    float *restrict red = img, *restrict green = img + hw, *restrict blue = img + 2 * hw;
    for (int64_t k = 0; k < hw; k++) {
        float r = red[k], g = green[k], b = blue[k]; /* whole numbers */
        float top = sel(r > g, r, g);
        top = sel(top > b, top, b);
        float low = sel(r < g, r, g);
        low = sel(low < b, low, b);
        float mid = ((r + g) + b - top) - low; /* exact: small whole numbers */
        float maxc = top / 255.0f, minc = low / 255.0f;
        int eq = maxc == minc;
        float cr = maxc - minc;
        float s = cr / sel(eq, 1.0f, maxc);
        float u = (maxc - mid / 255.0f) / sel(eq, 1.0f, cr);
        int is_r = top == r, is_g = !is_r & (top == g);
        int plus = (is_r & (g <= b)) | (is_g & (b < r)) | (!is_r & !is_g & (r <= g)); /* +u (then -1), or -u */
        float base = sel(is_r, 0.0f, sel(is_g, 2.0f, 4.0f)) + sel(plus, 0.0f, 1.0f);
        float hh = (base + sel(plus, u, -u)) + sel(plus, -1.0f, 0.0f);
        hh = hh / 6.0f + 1.0f;
        hh = sel(hh >= 1.0f, hh - 1.0f, hh); /* fmod(h, 1) for h in [0, 2) */
        hh = hh + shift;                     /* remainder(h, 1) for h in [-1, 2) */
        hh = sel(hh < 0.0f, hh + 1.0f, sel(hh >= 1.0f, hh - 1.0f, hh));
        float h6 = hh * 6.0f;
        float sector = trunc_pos(h6);
        float fr = h6 - sector;
        sector = sel(sector >= 6.0f, sector - 6.0f, sector); /* i % 6 */
        float v = maxc;
        float p = clamp01(v * (1.0f - s));
        float q = clamp01(v * (1.0f - s * fr));
        float t = clamp01(v * (1.0f - s * (1.0f - fr)));
        /* sectors 0..5: r = (v, q, p, p, t, v), g = (t, v, v, q, p, p), b = (p, p, t, v, v, q) */
        int s0 = sector == 0.0f, s1 = sector == 1.0f, s2 = sector == 2.0f;
        int s3 = sector == 3.0f, s4 = sector == 4.0f, s5 = sector == 5.0f;
        float ro = sel(s0 | s5, v, sel(s1, q, sel(s4, t, p)));
        float go = sel(s1 | s2, v, sel(s0, t, sel(s3, q, p)));
        float bo = sel(s3 | s4, v, sel(s2, t, sel(s5, q, p)));
        red[k] = trunc_pos(ro * 255.999f);
        green[k] = trunc_pos(go * 255.999f);
        blue[k] = trunc_pos(bo * 255.999f);
    }
}

/* ------------------------------------------------------------------------------------ pipelines */

/* Nearest-neighbour affine warp with zero fill, as torch's CPU grid_sample (align_corners=False) on
 * torchvision's grid: g = (xs[j] * m[0] + m[4]) + ys[i] * m[2] for x (m[1], m[5], m[3] for y), where m is
 * the (3, 2) matrix theta^T / (w / 2, h / 2); source index round_half_even((g + 1) * size / 2 - 0.5).
 * work: 3 * h * w floats for the source, plus 2 * w ints. */
static void warp_nearest(float *img, const float *m, const float *xs, const float *ys, int64_t h, int64_t w,
                         float *work) {
    int64_t hw = h * w;
    float *source = work;
    int32_t *restrict idx = (int32_t *)(work + 3 * hw), *restrict inside = idx + w;
    memcpy(source, img, (size_t)(3 * hw) * sizeof(float));
    float half_w = (float)w / 2.0f, half_h = (float)h / 2.0f;
    for (int64_t i = 0; i < h; i++) {
        for (int64_t j = 0; j < w; j++) { /* source pixel of each output pixel of the row */
            float gx = (xs[j] * m[0] + m[4]) + ys[i] * m[2];
            float gy = (xs[j] * m[1] + m[5]) + ys[i] * m[3];
            float ix = round_even((gx + 1.0f) * half_w - 0.5f);
            float iy = round_even((gy + 1.0f) * half_h - 0.5f);
            int ok = ix > -1.0f && ix < (float)w && iy > -1.0f && iy < (float)h;
            inside[j] = ok;
            idx[j] = ok ? (int32_t)iy * (int32_t)w + (int32_t)ix : 0;
        }
        for (int64_t c = 0; c < 3; c++) {
            const float *plane = source + c * hw;
            float *restrict o = img + c * hw + i * w;
            for (int64_t j = 0; j < w; j++) o[j] = inside[j] ? plane[idx[j]] : 0.0f;
        }
    }
}

/* shift by whole pixels with zero fill: out[y, x] = in[y - dy, x - dx]. work: 3 * h * w floats. */
static void translate(float *img, int64_t dx, int64_t dy, int64_t h, int64_t w, float *work) {
    int64_t hw = h * w;
    memcpy(work, img, (size_t)(3 * hw) * sizeof(float));
    for (int64_t c = 0; c < 3; c++) {
        for (int64_t y = 0; y < h; y++) {
            int64_t sy = y - dy;
            float *row = img + c * hw + y * w;
            for (int64_t x = 0; x < w; x++) {
                int64_t sx = x - dx;
                int inside = sy >= 0 && sy < h && sx >= 0 && sx < w;
                row[x] = inside ? work[c * hw + sy * w + sx] : 0.0f;
            }
        }
    }
}

/* The RandAugment ops' codes: the kernel_code column of augment_table.RANDAUGMENT, op ShearX as OP_SHEAR_X
 * (tests/test_augment_native.py checks that the two agree and that the switch below has a case for each). */
enum randaugment_op {
    OP_IDENTITY = 0,
    OP_SHEAR_X = 1,
    OP_SHEAR_Y = 2,
    OP_TRANSLATE_X = 3,
    OP_TRANSLATE_Y = 4,
    OP_ROTATE = 5,
    OP_BRIGHTNESS = 6,
    OP_COLOR = 7,
    OP_CONTRAST = 8,
    OP_SHARPNESS = 9,
    OP_POSTERIZE = 10,
    OP_SOLARIZE = 11,
    OP_AUTO_CONTRAST = 12,
    OP_EQUALIZE = 13,
};

/* One RandAugment op (its code) with argument v on one image. With warp != 0, ShearX, ShearY and Rotate
 * warp by matrix (see warp_nearest; xs, ys: torchvision's grid bases) and TranslateX / TranslateY shift by
 * trunc(v) pixels; with warp == 0 the caller does the geometric ops. */
static void randaugment_one(float *img, int64_t h, int64_t w, int64_t op, double v, int64_t warp,
                            const float *matrix, const float *xs, const float *ys, float *work) {
    int64_t hw = h * w;
    switch (op) {
    case OP_IDENTITY: break;
    case OP_SHEAR_X:
    case OP_SHEAR_Y:
    case OP_ROTATE:
        if (warp) warp_nearest(img, matrix, xs, ys, h, w, work);
        break;
    case OP_TRANSLATE_X:
        if (warp) translate(img, (int64_t)v, 0, h, w, work);
        break;
    case OP_TRANSLATE_Y:
        if (warp) translate(img, 0, (int64_t)v, h, w, work);
        break;
    case OP_BRIGHTNESS: brightness(img, 1.0 + v, hw); break;
    case OP_COLOR: saturation(img, 1.0 + v, hw, work); break;
    case OP_CONTRAST: contrast(img, 1.0 + v, hw, work); break;
    case OP_SHARPNESS: sharpness(img, 1.0 + v, h, w, work); break;
    case OP_POSTERIZE: posterize(img, v, hw); break;
    case OP_SOLARIZE: solarize(img, v, hw); break;
    case OP_AUTO_CONTRAST: autocontrast(img, hw); break;
    case OP_EQUALIZE: equalize(img, hw); break;
    default: break;
    }
}

/* ColorJitter of one image in its order (order: 4 op indices brightness, contrast, saturation, hue;
 * factors: 4, hue shift last; enabled: 4 flags; order NULL: no jitter), then, when scale is not NULL,
 * Normalize: x * scale[c] - shift[c] (float32 scale = 1 / (255 std), shift = mean / std). */
static void color_jitter_one(float *img, int64_t hw, const int64_t *order, const double *factors,
                             const uint8_t *enabled, const float *scale, const float *shift, float *work) {
    for (int step = 0; order != NULL && step < 4; step++) {
        int64_t op = order[step];
        if (!enabled[op]) continue;
        double f = factors[op];
        if (op == 0) brightness(img, f, hw);
        else if (op == 1) contrast(img, f, hw, work);
        else if (op == 2) saturation(img, f, hw, work);
        else hue(img, f, hw);
    }
    if (scale == NULL) return;
    for (int64_t c = 0; c < 3; c++) {
        float *restrict plane = img + c * hw;
        float a = scale[c], b = shift[c];
        for (int64_t k = 0; k < hw; k++) plane[k] = plane[k] * a - b;
    }
}

/* Work buffer sizes, in floats, for an (h, w) image (and a source width w_in for the crop). */
int64_t work_floats(int64_t h, int64_t w, int64_t w_in) { return 3 * h * w + 2 * w + 3 * (w_in + 8) + 3 * w; }

/* One RandAugment op slot: sample i of x (n, 3, h, w) gets the op of code ops[i] with values[i] (matrices:
 * (n, 3, 2)). */
void randaugment_slot(float *x, int64_t n, int64_t h, int64_t w, const int64_t *ops, const double *values,
                      int64_t warp, const float *matrices, const float *xs, const float *ys, float *work) {
    for (int64_t i = 0; i < n; i++) {
        const float *matrix = matrices == NULL ? NULL : matrices + i * 6;
        randaugment_one(x + i * 3 * h * w, h, w, ops[i], values[i], warp, matrix, xs, ys, work);
    }
}

/* ColorJitter (order, factors: (n, 4)) and optional Normalize of every sample of x (n, 3, h, w). */
void color_jitter(float *x, int64_t n, int64_t hw, const int64_t *order, const double *factors,
                  const uint8_t *enabled, const float *scale, const float *shift, float *work) {
    for (int64_t i = 0; i < n; i++) {
        color_jitter_one(x + i * 3 * hw, hw, order + i * 4, factors + i * 4, enabled, scale, shift, work);
    }
}

/* The whole per-sample pipeline, one sample at a time while it is in cache: crop (crop_one; src, ys, xs
 * for the whole batch, sample i at src + i * sn) into out (n, 3, oh, ow), then `slots` RandAugment ops per
 * sample (ops: their codes, values: (n, slots); matrices: (n, slots, 3, 2); gxs (ow), gys (oh): grid
 * bases), then ColorJitter (order NULL: none) and Normalize (scale NULL: none). */
void augment_fused(const uint8_t *src, int64_t n, int64_t h, int64_t w, int64_t sn, int64_t sc, int64_t sh,
                   int64_t sw, const double *ys, const double *xs, int64_t oh, int64_t ow, int64_t slots,
                   const int64_t *ops, const double *values, const float *matrices, const float *gxs,
                   const float *gys, const int64_t *order, const double *factors, const uint8_t *enabled,
                   const float *scale, const float *shift, float *out, float *work) {
    float *pixels = work, *row = work + 3 * oh * ow + 2 * ow, *lx = row + 3 * (w + 8), *kx = lx + ow;
    int32_t *x0 = (int32_t *)(kx + ow);
    for (int64_t i = 0; i < n; i++) {
        float *img = out + i * 3 * oh * ow;
        crop_one(src + i * sn, h, w, sc, sh, sw, ys + i * oh, xs + i * ow, oh, ow, img, row, x0, lx, kx);
        for (int64_t k = 0; k < slots; k++) {
            int64_t j = i * slots + k;
            randaugment_one(img, oh, ow, ops[j], values[j], 1, matrices + j * 6, gxs, gys, pixels);
        }
        color_jitter_one(img, oh * ow, order == NULL ? NULL : order + i * 4,
                         factors == NULL ? NULL : factors + i * 4, enabled, scale, shift, pixels);
    }
}

/* Per-batch Mixup (mode 1: x[i] = keep * x[i] + other * x[partner[i]]) or CutMix (mode 2: the box rows
 * y1..y2, columns x1..x2 of x[partner[i]] pasted into x[i]) of x (n, c, h, w), in place. The partner
 * permutation is walked cycle by cycle, so only the first image of each cycle needs a copy (work: c*h*w
 * floats, plus n bytes of flags). */
void mix_batch(float *x, int64_t n, int64_t c, int64_t h, int64_t w, const int64_t *partner, int64_t mode,
               float keep, float other, int64_t y1, int64_t y2, int64_t x1, int64_t x2, float *work,
               uint8_t *done) {
    int64_t size = c * h * w;
    memset(done, 0, (size_t)n);
    for (int64_t start = 0; start < n; start++) {
        if (done[start]) continue;
        memcpy(work, x + start * size, (size_t)size * sizeof(float));
        int64_t i = start;
        while (!done[i]) {
            int64_t j = partner[i];
            float *restrict dst = x + i * size;
            const float *restrict src = j == start ? work : x + j * size; /* x[start] is overwritten */
            if (mode == 1) {
                for (int64_t k = 0; k < size; k++) dst[k] = keep * dst[k] + other * src[k];
            } else {
                for (int64_t ch = 0; ch < c; ch++) {
                    for (int64_t y = y1; y < y2; y++) {
                        int64_t off = (ch * h + y) * w;
                        memcpy(dst + off + x1, src + off + x1, (size_t)(x2 - x1) * sizeof(float));
                    }
                }
            }
            done[i] = 1;
            i = j;
        }
    }
}
