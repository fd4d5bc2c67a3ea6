// Validates many DICOM files in one JVM with PixelMed's validators (Debian libpixelmed-java):
// an SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.*) with DicomSRValidator (IOD and templates, with
// its strictest options: code meanings matched in case, ambiguous templates, content item order
// and template identifiers checked), anything else with DicomInstanceValidator (IOD). Each validator is built once: building it
// compiles its XSLT, which takes most of a run's time.
//
// Run with Java's source launcher (no build step):
//   java -cp /usr/share/java/pixelmed.jar PixelMedBatch.java FILE...
// Prints "=== FILE <path>" before each file's report; exits 2 when a file cannot be read.

import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;

public class PixelMedBatch {
    public static void main(String[] args) throws Exception {
        DicomSRValidator srValidator = null;
        DicomInstanceValidator instanceValidator = null;
        int status = 0;
        for (String path : args) {
            System.out.println("=== FILE " + path);
            try {
                AttributeList list = new AttributeList();
                list.read(path);
                String sopClass = sopClassOf(list);
                if (sopClass.startsWith("1.2.840.10008.5.1.4.1.1.88.")) {
                    if (srValidator == null) {
                        srValidator = new DicomSRValidator();
                    }
                    // describe, match case, ambiguous template, item order, template ID
                    System.out.print(srValidator.validate(list, false, true, true, true, true));
                } else {
                    if (instanceValidator == null) {
                        instanceValidator = new DicomInstanceValidator();
                    }
                    System.out.print(instanceValidator.validate(list));
                }
            } catch (Exception e) {
                System.out.println("Error: validator could not read the file: " + e);
                status = 2;
            }
            System.out.flush();
        }
        System.exit(status);
    }

    private static String sopClassOf(AttributeList list) {
        return com.pixelmed.dicom.Attribute.getSingleStringValueOrEmptyString(
            list, TagFromName.SOPClassUID);
    }
}
