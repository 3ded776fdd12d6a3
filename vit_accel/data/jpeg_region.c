/* Decode one rectangle of a JPEG at full size into RGB rows: libjpeg-turbo's partial decoding.
 *
 * jpeg_skip_scanlines() passes the rows above the rectangle without the inverse DCT, upsampling
 * or colour conversion (entropy decoding only), jpeg_crop_scanline() limits those stages to the
 * iMCU columns that hold the rectangle, and decoding stops after its last row. Loaded with ctypes
 * by vit_accel/data/jpeg_region.py, which builds this file once per machine.
 *
 * Any libjpeg error or warning (corrupt or truncated data, a colour space without an RGB
 * conversion) ends the call with a non-zero status and a message; the caller then decodes the
 * file the exact way.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

struct region_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *message;
    int message_size;
};

static void region_fail(j_common_ptr cinfo)
{
    struct region_error *err = (struct region_error *)cinfo->err;
    if (err->message_size > 0)
        (*cinfo->err->format_message)(cinfo, err->message);  /* JMSG_LENGTH_MAX (200) bytes */
    longjmp(err->jump, 1);
}

static void region_message(j_common_ptr cinfo, int level)
{
    if (level < 0)  /* a warning: corrupt data that libjpeg would paper over */
        region_fail(cinfo);
}

/* Returns 0 and the decoded window [*left, *left + *width) x [y, y + h) in `out`, or 1 (libjpeg
 * refused; `message` says why), 2 (the rectangle is outside the image), 3 (`out` too small).
 * canvas == 0: `out` holds h rows of *width RGB pixels, the window alone. canvas != 0: `out` is
 * the whole image (height x width x 3) and the window's pixels land where they belong in it. */
int vit_accel_jpeg_region(const unsigned char *data, unsigned long size, int x, int y, int w, int h,
                          unsigned char *out, unsigned long out_size, int canvas, int *left, int *width,
                          char *message, int message_size)
{
    struct jpeg_decompress_struct cinfo;
    struct region_error err;
    JDIMENSION xoff, cwidth, image_width;
    unsigned long stride;
    int status = 0;

    if (message_size > 0)
        message[0] = '\0';
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = region_fail;
    err.pub.emit_message = region_message;
    err.message = message;
    err.message_size = message_size >= JMSG_LENGTH_MAX ? message_size : 0;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    if (x < 0 || y < 0 || w <= 0 || h <= 0 || (JDIMENSION)(x + w) > cinfo.output_width ||
        (JDIMENSION)(y + h) > cinfo.output_height || cinfo.output_components != 3) {
        status = 2;
        goto done;
    }
    image_width = cinfo.output_width;  /* jpeg_crop_scanline sets output_width to the window's */
    xoff = (JDIMENSION)x;
    cwidth = (JDIMENSION)w;
    jpeg_crop_scanline(&cinfo, &xoff, &cwidth);
    if (canvas) {
        stride = (unsigned long)image_width * 3;
        if (stride * cinfo.output_height > out_size) {
            status = 3;
            goto done;
        }
        out += (unsigned long)y * stride + (unsigned long)xoff * 3;
    } else {
        stride = (unsigned long)cwidth * 3;
        if (stride * (unsigned long)h > out_size) {
            status = 3;
            goto done;
        }
    }
    if (y > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y) != (JDIMENSION)y) {
        status = 1;
        goto done;
    }
    while (cinfo.output_scanline < (JDIMENSION)(y + h)) {
        JSAMPROW row = out + (cinfo.output_scanline - (JDIMENSION)y) * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    *left = (int)xoff;
    *width = (int)cwidth;
done:
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return status;
}
